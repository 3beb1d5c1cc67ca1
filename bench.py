"""Memory and time of the loss path, chunked vs naive, and the time split of a training step (CPU).

    python bench.py                  # V = 151,936, B = 2, T = 2,048, then a tiny-model training step
    python bench.py --tokens 512     # quicker

Part 1 builds a Qwen3 with a tiny body (2 layers, hidden 64) but the real vocabulary, and runs one
forward + backward of the loss (body -> LM head -> log-probs -> clipped loss) two ways:
  naive:   full (B, T, V) fp32 logits, log_softmax, gather;
  chunked: stapo.token_logp, LM head + log-softmax per chunk of tokens, recomputed in backward.
Each runs in a fresh subprocess; its peak memory is the rise of the process's peak RSS during the pass.
Part 2 times the phases of one stapo training step on the tiny model, chunked and unchunked.
"""

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

import stapo

VOCAB = 151_936


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
    totals = dict.fromkeys(("generation + reward", "old log-probs", "update"), 0.0)
    for step in range(steps):
        m, _ = stapo.train_step(model, tok, optimizer, problems, step, cfg)
        totals["generation + reward"] += m["gen_s"] / steps
        totals["old log-probs"] += m["logp_s"] / steps
        totals["update"] += (m["train_s"] - m["logp_s"]) / steps
    return totals


def main():
    p = argparse.ArgumentParser(description="STAPO memory/speed benchmark")
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
