"""Memory and time of the loss path, chunked vs naive, of a training step (CPU), and a GPU self-check.

    python bench.py                  # V = 151,936, B = 2, T = 2,048, then a tiny-model training step
    python bench.py --tokens 512     # quicker
    python bench.py --gpu [--model M] [--weights] [any stapo.py flag]   # the self-check: exit 1 if over plan

Part 1 builds a Qwen3 with a tiny body (2 layers, hidden 64) but the real vocabulary, and runs one
forward + backward of the loss (body -> LM head -> log-probs -> clipped loss) two ways:
  naive:   full (B, T, V) fp32 logits, log_softmax, gather;
  chunked: stapo.token_logp, LM head + log-softmax per chunk of tokens, recomputed in backward.
Each runs in a fresh subprocess; its peak memory is the rise of the process's peak RSS during the pass.
Part 2 times the phases of one stapo training step on the tiny model, chunked and unchunked.

--gpu runs one stapo.train_step at the given flags and prints, per phase (generation, scoring, update,
optimizer step), its seconds and its peak torch.cuda.max_memory_allocated next to stapo.plan_memory's peak;
decode tokens/s (sequences x decoding steps / generate seconds); and the KV cache's bytes per token of a
sequence, read from the keys and values the cache stores, next to stapo.kv_bytes_per_token. Exit 1 when a
peak exceeds its plan or the KV bytes differ. The model is built from its config at its real width with
random fp32 weights (no weights downloaded; --model takes a folder with config.json; --weights loads the
trained ones), its tokenizer if cached, else the byte tokenizer. Random weights almost never emit EOS,
so every answer runs to --max-new-tokens, and each prompt is tiled to --max-prompt-tokens: the full-length
sequences the plan sizes for, its worst case. AdamW's states exist before the step, as from step 2 on.
  CUDA defaults: Qwen/Qwen3-1.7B-Base, P=4, G=8, 1,024 prompt + 1,024 new tokens, bf16 autocast: about
  1-2 minutes on one H100 (estimated, not yet timed: ~35 s of decoding at ~30 steps/s, seconds for the
  rest). The plan turns gradient checkpointing on for 80 GB and off for 141 GB (H200).
  Without CUDA, or with --device cpu: the tiny model, bf16 autocast, P=2, G=2, 32 + 16 tokens, seconds;
  peaks are n/a (no allocator statistics on CPU), the KV bytes are compared all the same.
"""

import argparse
import json
import resource
import subprocess
import sys
import time
from contextlib import ExitStack
from unittest import mock

import torch

import stapo

VOCAB = 151_936
GPU_CHECK = "--prompts-per-step 4 --group-size 8 --max-new-tokens 1024".split()  # about 1-2 minutes on an H100
CPU_CHECK = "--model tiny --precision bf16-autocast --prompts-per-step 2 --group-size 2 --max-prompt-tokens 32 \
--max-new-tokens 16".split()


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


class Phases:
    """While entered, wraps stapo's generate, score, ppo_update and optimizer_step to take each phase's
    seconds (less the phases nested in it) and, on CUDA, its peak torch.cuda.max_memory_allocated (reset
    as each phase starts and ends); records the dtype and size of the first keys and values of each layer."""

    WRAPPED = {"generation": "generate", "scoring": "score", "update": "ppo_update", "optimizer step": "optimizer_step"}

    def __init__(self, device: torch.device, layers: int):
        self.device, self.cuda, self.layers = device, device.type == "cuda", layers
        self.seconds, self.peak = dict.fromkeys(self.WRAPPED, 0.0), dict.fromkeys(self.WRAPPED, 0)
        self.open = []  # [phase, start, seconds of the phases nested in it], innermost last
        self.kv = []  # (keys dtype, values dtype, K + V bytes per token of one sequence), one per layer
        self.decoded = 0  # sequences x decoding steps

    def close_peak(self):  # the peak since the last reset is the innermost open phase's
        if self.cuda:
            torch.cuda.synchronize(self.device)
            if self.open:
                phase = self.open[-1][0]
                self.peak[phase] = max(self.peak[phase], torch.cuda.max_memory_allocated(self.device))
            torch.cuda.reset_peak_memory_stats(self.device)

    def wrap(self, phase: str, fn):
        def measured(*args, **kwargs):
            self.close_peak()
            self.open.append([phase, time.perf_counter(), 0.0])
            out = fn(*args, **kwargs)
            self.close_peak()
            _, start, nested = self.open.pop()
            self.seconds[phase] += time.perf_counter() - start - nested
            if self.open:
                self.open[-1][2] += time.perf_counter() - start
            self.decoded += out.completions.numel() if phase == "generation" else 0
            return out

        return measured

    def __enter__(self):
        from transformers.cache_utils import DynamicLayer

        def update(layer, keys, values, *args, **kwargs):  # keys, values (b, K, t, d)
            if len(self.kv) < self.layers:  # the prefill of the first generate call, layer by layer
                per_token = sum(x[0, :, 0].numel() * x.element_size() for x in (keys, values))  # K * d each
                self.kv.append((keys.dtype, values.dtype, per_token))
            return original(layer, keys, values, *args, **kwargs)

        original, self.patches = DynamicLayer.update, ExitStack()
        self.patches.enter_context(mock.patch.object(DynamicLayer, "update", update))
        for phase, name in self.WRAPPED.items():
            self.patches.enter_context(mock.patch.object(stapo, name, self.wrap(phase, getattr(stapo, name))))
        return self

    def __exit__(self, *exc):
        self.patches.close()


def time_training_step(chunk: int, steps: int) -> dict:
    """Seconds per phase of stapo.train_step on the tiny model (mean over `steps`). The random model
    earns no reward, so advantages are 0, but the update does the same forward and backward work."""
    torch.manual_seed(0)
    model, tok = stapo.load_policy("tiny", torch.device("cpu"))
    cfg = stapo.Config(model="tiny", prompts_per_step=8, group_size=8, max_new_tokens=64, logit_chunk=chunk)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    problems = [{**e, "prompt_ids": stapo.encode_prompt(e["problem"], tok)} for e in stapo.toy_problems()]
    with Phases(torch.device("cpu"), model.config.num_hidden_layers) as phases:
        for step in range(steps):
            stapo.train_step(model, tok, optimizer, problems, step, cfg)
    return {phase: seconds / steps for phase, seconds in phases.seconds.items()}


def random_policy(cfg: stapo.Config, device: torch.device):
    """(model, tokenizer): random fp32 weights at the config's width, built on the device; the model's own
    tokenizer if this machine has it, else the byte tokenizer (its ids are valid in any vocabulary)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(cfg.seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(stapo.load_model_config(cfg.model), dtype=torch.float32)
    try:
        tokenizer = AutoTokenizer.from_pretrained(cfg.model, local_files_only=True) if cfg.model != "tiny" else None
    except (OSError, ValueError):
        tokenizer = None
    if tokenizer is None or len(tokenizer) <= 256:  # from a bare config.json, transformers makes an empty one
        return model, stapo.build_tiny_tokenizer()
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    return model, tokenizer


def self_check(argv: list[str]) -> int:
    """python bench.py --gpu [--weights] [stapo flags]: one training step measured against the plan (see the
    module docstring). Returns the exit code: 1 when a phase's peak exceeds its plan or the KV bytes differ."""
    p = argparse.ArgumentParser(prog="bench.py --gpu", add_help=False)
    p.add_argument("--weights", action="store_true", help="load the model's trained weights instead of random ones")
    p.add_argument("--device", default="auto")
    own, rest = p.parse_known_args(argv)
    cuda = own.device != "cpu" and torch.cuda.is_available()
    cfg = stapo.parse_args([*(GPU_CHECK if cuda else CPU_CHECK), "--device", own.device, *rest])  # flags win
    device = stapo.resolve_device(cfg)
    plan, cfg = stapo.plan_or_stop(stapo.load_model_config(cfg.model), cfg, device)  # exits when it does not fit
    start = time.perf_counter()
    model, tok = stapo.load_policy(cfg.model, device, cfg.seed) if own.weights else random_policy(cfg, device)
    if plan["gradient_checkpointing"]:
        model.activation_checkpointing_enable()
    model.train()
    optimizer, _ = stapo.build_optimizer(model, cfg)
    for param in model.parameters():  # AdamW's states, as from step 2 on: a step with zero gradients
        param.grad = torch.zeros_like(param)
    stapo.optimizer_step(model, optimizer, cfg.grad_clip)
    weights = "trained" if own.weights else "random"
    print(f"{cfg.model}: {weights} weights, AdamW states on {device} in {time.perf_counter() - start:.1f} s")
    n, vocab = cfg.max_prompt_tokens, model.config.vocab_size
    prompts = [stapo.encode_prompt(e["problem"], tok, cfg.prompt_format) for e in stapo.toy_problems()]
    problems = [{**e, "prompt_ids": ids.clamp(max=vocab - 1).repeat(-(-n // len(ids)))[-n:]}  # n tokens, end kept
                for e, ids in zip(stapo.toy_problems(), prompts, strict=True)]  # fmt: skip
    with Phases(device, model.config.num_hidden_layers) as phases:
        metrics, _ = stapo.train_step(model, tok, optimizer, problems, 0, cfg)

    print(f"{'phase':<16}{'seconds':>9}{'peak GB':>10}{'plan GB':>10}")
    over = []
    for phase in Phases.WRAPPED:
        planned = plan["peak_" + phase.replace(" ", "_")]
        over += [phase] if phases.peak[phase] > planned else []
        peak = f"{phases.peak[phase] / 1e9:10.2f}" if cuda else f"{'n/a':>10}"
        print(f"{phase:<16}{phases.seconds[phase]:9.2f}{peak}{planned / 1e9:10.2f}{'  OVER PLAN' * (phase in over)}")
    gen_s = phases.seconds["generation"]
    steps = phases.decoded // metrics["samples"]
    print(f"decode: {metrics['samples']} sequences x {steps:,} steps in {gen_s:.1f} s = {phases.decoded / gen_s:,.0f} "
          f"tokens/s (answers {metrics['len_mean']:.0f} tokens on average)")  # fmt: skip
    planned = stapo.kv_bytes_per_token(model.config, stapo.uses_bf16(cfg, device))
    measured = sum(b for *_, b in phases.kv)
    keys, values = ("/".join(sorted({str(r[i]).removeprefix("torch.") for r in phases.kv})) for i in (0, 1))
    kv_ok = len(phases.kv) == model.config.num_hidden_layers and measured == planned
    print(f"KV cache per token of a sequence: keys {keys}, values {values}; {measured:,} bytes measured, "
          f"{planned:,} planned: {'match' if kv_ok else 'MISMATCH'}")  # fmt: skip
    return int(bool(over) or not kv_ok)


def main():
    if "--gpu" in sys.argv[1:]:
        sys.exit(self_check([a for a in sys.argv[1:] if a != "--gpu"]))
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
