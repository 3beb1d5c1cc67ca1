"""Memory and time of the loss path, chunked vs naive, and of a training step (CPU); and the GPU self-check.

    python bench.py                  # V = 151,936, B = 2, T = 2,048, then a tiny-model training step
    python bench.py --tokens 512     # quicker
    python bench.py --gpu [--full-shape] [--model FOLDER] [--weights] [any stapo.py flag]   # one step vs the plan
    python bench.py --gpu-check [--out DIR] [--device cpu]   # the prepared check: environment, --gpu twice, summary

Part 1 builds a Qwen3 with a tiny body (2 layers, hidden 64) but the real vocabulary, and runs one
forward + backward of the loss (body -> LM head -> log-probs -> clipped loss) two ways:
  naive:   full (B, T, V) fp32 logits, log_softmax, gather;
  chunked: stapo.token_logp, LM head + log-softmax per chunk of tokens, recomputed in backward.
Each runs in a fresh subprocess; its peak memory is the rise of the process's peak RSS during the pass.
Part 2 times the phases of one stapo training step on the tiny model, chunked and unchunked.

--gpu runs one stapo.train_step and prints, per phase (generation, scoring, update with its optimizer steps),
its seconds (the GPU synchronised) and its peak torch.cuda.max_memory_allocated next to plan.py's peak; decode
tokens/s; the KV cache's bytes per token read from the keys and values it stores, next to
stapo.kv_bytes_per_token; and, as an extrapolation, what a step of the default command would take. It needs
no network: the model is Qwen3-1.7B-Base's shape from a config written below (--model takes a folder with a
config.json), built at real width with random fp32 weights, with the byte tokenizer (--weights loads a local
checkpoint with its own). Random weights almost never emit EOS, so every answer runs to --max-new-tokens,
and each prompt is tiled to --max-prompt-tokens: the full-length sequences the plan sizes for. AdamW's states
exist before the step, as from step 2 on. Exit 0: within the plan; 1: a phase over its plan, the KV bytes
different, or the plan refuses; 3: the model's config could not be had (a Hub id without network).
  CUDA: P=4, G=8, 1,024 + 1,024 tokens, bf16 autocast; --full-shape: one generate call of the default
  command, 64 sequences of 1,024 + 4,096 tokens. Estimated, not yet run on a GPU: HF generate decodes about
  30 steps/s at 1.7B on an H100 (it is launch-bound), so about 35 s and 2.5 min of decoding, and seconds of
  scoring and update: about 5 minutes for --gpu-check in all.
  Without CUDA, or with --device cpu: the tiny model, bf16 autocast, seconds; peaks are n/a (no allocator
  statistics on CPU), the KV bytes are compared all the same.
"""

import argparse
import importlib.metadata
import json
import platform
import resource
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from unittest import mock

import torch

import plan
import stapo

VOCAB = 151_936
QWEN3_1_7B = dict(vocab_size=VOCAB, hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                  num_attention_heads=16, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True,
                  max_position_embeddings=32_768, rope_theta=1_000_000, eos_token_id=151_643)  # fmt: skip
GPU_CHECK = "--prompts-per-step 4 --group-size 8 --max-new-tokens 1024".split()
FULL_SHAPE = "--prompts-per-step 8 --group-size 8 --max-new-tokens 4096 --generate-batch 64".split()
CPU_CHECK = "--model tiny --precision bf16-autocast --prompts-per-step 2 --group-size 2 --max-prompt-tokens 32 \
--max-new-tokens 16".split()
CPU_FULL_SHAPE = "--prompts-per-step 4 --group-size 4 --max-new-tokens 32".split()
FLOORS = {"torch": (2, 6), "transformers": (5, 16), "datasets": (4, 2)}  # requirements.txt's
NO_CONFIG = 3  # the exit code when the model's config could not be had


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def build(batch: int, tokens: int, seed: int = 0):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    config = Qwen3Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True,
                         max_position_embeddings=tokens + 16)  # fmt: skip
    model = Qwen3ForCausalLM(config)
    ids = torch.randint(0, VOCAB, (batch, tokens + 1))  # (B, T + 1): one context token, T targets
    return model, ids


def loss_path(model, ids, chunk: int | None, temperature: float = 0.7):
    """logp (B, T) of ids[:, 1:] and the loss; chunk=None is the naive full-logits path."""
    targets = ids[:, 1:]  # (B, T)
    hidden = model.base_model(input_ids=ids[:, :-1]).last_hidden_state  # (B, T, D)
    if chunk is None:
        logits = model.lm_head(hidden).float() / temperature  # (B, T, V): the memory this issue removes
        logp = logits.log_softmax(-1).gather(-1, targets[..., None]).squeeze(-1)  # (B, T)
    else:
        logp, _ = stapo.token_logp(hidden, model.lm_head.weight, targets, temperature, chunk)  # (B, T)
    keep = torch.ones_like(targets, dtype=torch.bool)
    advantages = torch.linspace(-1, 1, ids.shape[0])
    return logp, stapo.policy_loss(logp, logp.detach(), advantages, keep, keep.sum())


def entropy_path(model, ids, chunk: int | None, temperature: float = 0.7):
    with torch.no_grad():
        hidden = model.base_model(input_ids=ids[:, :-1]).last_hidden_state
        if chunk is None:
            logprobs = (model.lm_head(hidden).float() / temperature).log_softmax(-1)
            return -(logprobs.exp() * logprobs).sum(-1)
        return stapo.token_logp(hidden, model.lm_head.weight, ids[:, 1:], temperature, chunk, with_entropy=True)[1]


def child(args):
    """One variant in this process: peak memory and time of forward + backward."""
    torch.set_num_threads(args.threads)
    model, ids = build(args.batch, args.tokens)
    chunk = None if args.variant == "naive" else args.chunk
    before = rss_mb()
    start = time.perf_counter()
    logp, loss = loss_path(model, ids, chunk)
    loss.backward()
    seconds = time.perf_counter() - start
    peak = peak_rss_mb() - before
    torch.save({"logp": logp.detach(), "entropy": entropy_path(model, ids, chunk),
                "grads": {n: p.grad for n, p in model.named_parameters()}}, args.out)  # fmt: skip
    print(json.dumps({"variant": args.variant, "chunk": chunk, "peak_mb": peak, "seconds": seconds}))


def compare_loss_paths(args):
    print(f"loss path: V={VOCAB:,}, B={args.batch}, T={args.tokens:,}, tiny body, fp32, {args.threads} threads")
    rows, outs = [], {}
    for variant in ("naive", "chunked"):
        out = f"/tmp/stapo_bench_{variant}.pt"
        cmd = [sys.executable, __file__, "--child", variant, "--out", out, "--batch", str(args.batch),
               "--tokens", str(args.tokens), "--chunk", str(args.chunk), "--threads", str(args.threads)]  # fmt: skip
        rows.append(json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1]))
        outs[variant] = torch.load(out)
    for r in rows:
        label = "naive (full logits)" if r["chunk"] is None else f"chunked ({r['chunk']} tokens)"
        print(f"  {label:<22} peak {r['peak_mb']:8.0f} MB   time {r['seconds']:6.2f} s")
    naive, chunked = outs["naive"], outs["chunked"]
    diff = {
        "logp": (naive["logp"] - chunked["logp"]).abs().max().item(),
        "entropy": (naive["entropy"] - chunked["entropy"]).abs().max().item(),
        "grad": max((naive["grads"][n] - chunked["grads"][n]).abs().max().item() for n in naive["grads"]),
    }
    print(f"  memory ratio {rows[0]['peak_mb'] / rows[1]['peak_mb']:.1f}x; max |difference|: "
          + ", ".join(f"{k} {v:.1e}" for k, v in diff.items()))  # fmt: skip
    return rows, diff


def time_training_step(chunk: int, steps: int) -> dict:
    """Seconds per phase of stapo.train_step on the tiny model (mean over `steps`). The random model
    earns no reward, so advantages are 0, but the update does the same forward and backward work."""
    torch.manual_seed(0)
    model, tok = stapo.load_policy("tiny", torch.device("cpu"))
    cfg = stapo.Config(model="tiny", prompts_per_step=8, group_size=8, max_new_tokens=64, logit_chunk=chunk)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    problems = [{**e, "prompt_ids": stapo.encode_prompt(e["problem"], tok)} for e in stapo.toy_problems()]
    seconds = {"generation": 0.0, "scoring": 0.0, "update": 0.0}
    for step in range(steps):
        metrics, _ = stapo.train_step(model, tok, optimizer, problems, step, cfg)
        for phase in seconds:
            seconds[phase] += metrics[f"{phase}_s"] / steps
    return seconds


@contextmanager
def recording_kv(layers: int):
    """(keys dtype, values dtype, K + V bytes per token of one sequence) of each layer, as the cache stores them."""
    from transformers.cache_utils import DynamicLayer

    seen, update = [], DynamicLayer.update

    def recording(layer, keys, values, *args, **kwargs):  # keys, values (b, K, t, d)
        if len(seen) < layers:  # the prefill of the first generate call, layer by layer
            seen.append((keys.dtype, values.dtype, sum(x[0, :, 0].numel() * x.element_size() for x in (keys, values))))
        return update(layer, keys, values, *args, **kwargs)

    with mock.patch.object(DynamicLayer, "update", recording):
        yield seen


def self_check(argv: list[str]) -> int:
    """python bench.py --gpu [--full-shape] [--weights] [--json FILE] [stapo flags]: one training step measured
    against the plan (see the module docstring). Returns the exit code."""
    p = argparse.ArgumentParser(prog="bench.py --gpu", add_help=False)
    p.add_argument("--weights", action="store_true", help="load the model's trained weights instead of random ones")
    p.add_argument("--full-shape", action="store_true", help="one generate call of the default command")
    p.add_argument("--json", help="also write the measurements to this file")
    p.add_argument("--device", default="auto")
    own, rest = p.parse_known_args(argv)
    cuda = own.device != "cpu" and torch.cuda.is_available()
    shape = (GPU_CHECK + FULL_SHAPE * own.full_shape) if cuda else (CPU_CHECK + CPU_FULL_SHAPE * own.full_shape)
    cfg = stapo.parse_args([*shape, "--device", own.device, *rest])  # the flags given win
    device = stapo.resolve_device(cfg)
    from transformers import AutoModelForCausalLM, Qwen3Config

    builtin = cfg.model == stapo.Config.model and not own.weights  # the default's shape is written above: no request
    try:
        with stapo.loading("--model", "tiny" if builtin else cfg.model):  # a Hub id without network exits NO_CONFIG
            config = Qwen3Config(**QWEN3_1_7B) if builtin else stapo.load_model_config(cfg.model)
            tok = stapo.load_tokenizer(cfg.model) if own.weights else stapo.build_tiny_tokenizer()
    except SystemExit as e:
        print(f"{e.code} (the model's config could not be had: exit {NO_CONFIG})", file=sys.stderr)
        return NO_CONFIG
    cfg, parts = stapo.fit_memory(config, cfg, device)  # exits 1 when the weights and AdamW alone do not fit
    peaks = plan.plan_memory(config, cfg, 1, parts["budget"] / stapo.HEADROOM, device.type)
    start = time.perf_counter()
    if own.weights:
        model = stapo.load_policy(cfg.model, device, cfg.seed)[0]
    else:
        torch.manual_seed(cfg.seed)
        with torch.device(device):
            model = stapo.load_model("tiny", device, tok) if cfg.model == "tiny" else \
                AutoModelForCausalLM.from_config(config, dtype=torch.float32)  # fmt: skip
    if cfg.gradient_checkpointing == "on":
        stapo.enable_checkpointing(model)
    optimizer, _ = stapo.build_optimizer(model.train(), cfg)
    for param in model.parameters():  # AdamW's states, as from step 2 on: a step with zero gradients
        param.grad = torch.zeros_like(param)
    stapo.optimizer_step(model, optimizer, cfg.grad_clip)
    print(f"{cfg.model}: {'trained' if own.weights else 'random'} weights, AdamW states on {device} in "
          f"{time.perf_counter() - start:.1f} s")  # fmt: skip
    n, vocab = cfg.max_prompt_tokens, model.config.vocab_size
    problems = [{**e, "prompt_ids": stapo.encode_prompt(e["problem"], tok, cfg.prompt_format).clamp(max=vocab - 1)}
                for e in stapo.toy_problems()]  # fmt: skip
    for p in problems:  # n tokens each, the end (the chat template's assistant turn) kept
        p["prompt_ids"] = p["prompt_ids"].repeat(-(-n // len(p["prompt_ids"])))[-n:]
    with recording_kv(model.config.num_hidden_layers) as kv:
        metrics, _ = stapo.train_step(model, tok, optimizer, problems, 0, cfg)

    result = {"device": torch.cuda.get_device_name(device) if cuda else "cpu", "model": cfg.model, "phases": {}}
    print(f"{'phase':<16}{'seconds':>9}{'peak GB':>10}{'plan GB':>10}")
    for phase, planned in (("generation", peaks["peak_generation"]), ("scoring", peaks["peak_scoring"]),
                           ("update", max(peaks["peak_update"], peaks["peak_optimizer_step"]))):  # fmt: skip
        peak = metrics.get(f"{phase}_gb")
        over = peak is not None and peak * 1e9 > planned
        result["phases"][phase] = {"seconds": metrics[f"{phase}_s"], "peak_gb": peak, "plan_gb": planned / 1e9}
        shown = f"{peak:10.2f}" if peak is not None else f"{'n/a':>10}"
        print(f"{phase:<16}{metrics[f'{phase}_s']:9.2f}{shown}{planned / 1e9:10.2f}{'  OVER PLAN' * over}")
    calls = -(-metrics["samples"] // cfg.generate_batch)
    decoded, gen_s = metrics["samples"] * cfg.max_new_tokens, metrics["generation_s"]
    result["decode_tokens_per_s"] = decoded / gen_s
    print(f"decode: {metrics['samples']} sequences x {cfg.max_new_tokens:,} steps in {calls} call(s), {gen_s:.1f} s = "
          f"{decoded / gen_s:,.0f} tokens/s, {calls * cfg.max_new_tokens / gen_s:.1f} steps/s")  # fmt: skip
    planned = stapo.kv_bytes_per_token(model.config, stapo.uses_bf16(cfg, device))
    measured = sum(b for *_, b in kv)
    keys, values = ("/".join(sorted({str(r[i]).removeprefix("torch.") for r in kv})) for i in (0, 1))
    kv_ok = len(kv) == model.config.num_hidden_layers and measured == planned
    result["kv"] = {"keys": keys, "values": values, "measured": measured, "planned": planned, "match": kv_ok}
    print(f"KV cache per token of a sequence: keys {keys}, values {values}; {measured:,} bytes measured, "
          f"{planned:,} planned: {'match' if kv_ok else 'MISMATCH'}")  # fmt: skip
    result["default_step_s"] = extrapolate(metrics, cfg, config, device, calls)
    print(f"extrapolated, a step of the default command (P=32, G=8, 1,024 + 4,096 tokens) of {cfg.model} here: " +
          ", ".join(f"{k} {v:.0f} s" for k, v in result["default_step_s"].items()))  # fmt: skip
    over = any(r["peak_gb"] is not None and r["peak_gb"] > r["plan_gb"] for r in result["phases"].values())
    result["exit"] = int(over or not kv_ok)
    if own.json:
        Path(own.json).write_text(json.dumps(result, indent=2))
    return result["exit"]


def extrapolate(metrics: dict, cfg: stapo.Config, config, device: torch.device, calls: int) -> dict:
    """Seconds of a default step from this one: its decoding steps at the rate measured (a lower bound: later steps
    attend to longer contexts), scoring and update in proportion to the tokens."""
    default = stapo.Config(gpu_memory_gb=cfg.gpu_memory_gb, precision=cfg.precision)
    default_calls = stapo.fit(
        config, default, 1, stapo.device_memory(default, device), stapo.uses_bf16(default, device)
    )
    default_calls = -(-default.prompts_per_step * default.group_size // default_calls["generate_batch"])
    steps = calls * cfg.max_new_tokens
    tokens = metrics["samples"] * (cfg.max_prompt_tokens + metrics["len_mean"])
    default_tokens = (
        default.prompts_per_step * default.group_size * (default.max_prompt_tokens + default.max_new_tokens)
    )
    estimate = {"generation": metrics["generation_s"] / steps * default_calls * default.max_new_tokens,
                "scoring": metrics["scoring_s"] * default_tokens / tokens,
                "update": metrics["update_s"] * default_tokens / tokens}  # fmt: skip
    return estimate | {"total": sum(estimate.values())}


def version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def gpu_check(argv: list[str]) -> int:
    """python bench.py --gpu-check [--out DIR] [--device cpu]: the environment, then --gpu at the defaults and at
    --full-shape (each within a time limit), every output in DIR with a summary.md. The exit code is the worst."""
    p = argparse.ArgumentParser(prog="bench.py --gpu-check")
    p.add_argument("--out", default=f"gpu-check-{time.strftime('%Y%m%d-%H%M%S')}", help="folder for every output")
    p.add_argument("--device", default="auto", help="cpu: the same flow on the tiny model")
    p.add_argument("--timeout", type=int, default=900, help="seconds each --gpu run may take")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    versions = {name: version(name) for name in FLOORS}  # datasets is not needed for the check, so not imported
    low = [f"{k} {v} < {'.'.join(map(str, FLOORS[k]))}" for k, v in versions.items()
           if v != "not installed" and tuple(int(x) for x in v.split("+")[0].split(".")[:2]) < FLOORS[k]]  # fmt: skip
    cuda = torch.cuda.is_available() and args.device != "cpu"
    env = [f"python {platform.python_version()}, " + ", ".join(f"{k} {v}" for k, v in versions.items()),
           f"CUDA: {torch.cuda.get_device_name() if cuda else 'not used' if args.device == 'cpu' else 'NOT AVAILABLE'}",
           f"below the floors of requirements.txt: {', '.join(low) or 'none'}"]  # fmt: skip
    (out / "environment.txt").write_text("\n".join(env) + "\n")
    print("\n".join(env))
    if low or not (cuda or args.device == "cpu"):
        print("the environment is not one this code supports; see environment.txt", file=sys.stderr)
        return 4
    summary, codes = ["# GPU check", "", *env, ""], []
    for name, extra in (("default", []), ("full-shape", ["--full-shape"])):
        command = [sys.executable, __file__, "--gpu", "--device", args.device, "--json", str(out / f"{name}.json"),
                   *extra]  # fmt: skip
        print(f"{name}: {' '.join(command[1:])}", flush=True)
        try:
            run = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout)
            code, text = run.returncode, run.stdout + run.stderr
        except subprocess.TimeoutExpired as e:
            code, text = 124, f"{e.stdout or ''}{e.stderr or ''}\ntimed out after {args.timeout} s"
        (out / f"{name}.txt").write_text(text)
        codes.append(code)
        summary += [f"## {name}: exit {code}", "", "```", *text.strip().splitlines()[-9:], "```", ""]
    (out / "summary.md").write_text("\n".join(summary))
    print(f"wrote {out / 'summary.md'}; exit {max(codes)}")
    return max(codes)


def main():
    if "--gpu" in sys.argv[1:]:
        sys.exit(self_check([a for a in sys.argv[1:] if a != "--gpu"]))
    if "--gpu-check" in sys.argv[1:]:
        sys.exit(gpu_check([a for a in sys.argv[1:] if a != "--gpu-check"]))
    p = argparse.ArgumentParser(description="STAPO memory/speed benchmark; --gpu: the self-check (see the docstring)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--chunk", type=int, default=stapo.Config.logit_chunk)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--steps", type=int, default=5, help="training steps timed in part 2")
    p.add_argument("--child", choices=("naive", "chunked"), help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        args.variant = args.child
        return child(args)
    compare_loss_paths(args)
    print(f"\ntraining step on the tiny model (P=8, G=8, 64 new tokens), mean of {args.steps} steps:")
    for chunk, label in ((0, "unchunked"), (args.chunk, f"chunked ({args.chunk})")):
        split = time_training_step(chunk, args.steps)
        total = sum(split.values())
        print(f"  {label:<15} total {total:5.2f} s | " + " | ".join(f"{k} {v:.2f} s" for k, v in split.items()))


if __name__ == "__main__":
    main()
