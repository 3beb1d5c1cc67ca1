"""STAPO: Spurious-Token-Aware Policy Optimization, in one file.

Reference: Liu et al., "STAPO: Stabilizing Reinforcement Learning for LLMs by Silencing Rare
Spurious Tokens", arXiv 2602.15620v4 (12 May 2026).

One training step:
  1. Rollouts: sample G answers for each of P math problems (B = P*G sequences).
  2. Reward: 1 if the last \\boxed{} of an answer matches the gold answer, else 0.
  3. Advantage: z-score of the rewards inside each group of G; every token of an answer shares it.
  4. S2T mask: silence the "spurious" tokens, those sampled with probability < tau_p in a
     low-entropy state inside an answer with A > 0 (about 0.01 % of tokens).
  5. Update: clipped (clip-higher) policy-gradient loss summed over the remaining tokens and
     divided by their number in the whole mini-batch. No KL, no entropy bonus, no value net.

The paper's baselines run in the same loop: --mask none is JustRL/DAPO, --mask high-entropy is
20-Entropy, and --mask none --loss-agg sequence --eps-high 0.2 is GRPO. Every line where STAPO
differs from plain DAPO carries a "# STAPO:" comment.

Reading order: 1. Config, 2. the paper's math on plain tensors, 3. one training step, 4. the loop
and main; then an appendix of support code (verifier, data and prompt, models, checkpoints and logs).
Several GPUs: torchrun --nproc_per_node N stapo.py ... shards the model with FSDP2 (appendix F);
every statistic the paper takes over a mini-batch is then taken over all ranks (all_cat, all_sum,
identities in one process). Left out on purpose: vLLM (HF `generate` is slower but readable),
sequence packing, the KL term (the paper uses none).

Run:   python stapo.py --model Qwen/Qwen3-1.7B-Base          (one GPU)
       python stapo.py --model tiny --dataset toy --steps 3  (CPU smoke run, no downloads)
       torchrun --nproc_per_node 8 stapo.py --model Qwen/Qwen3-8B-Base   (8 GPUs, one node)
Test:  pytest -q
"""

import argparse
import dataclasses
import datetime
import functools
import importlib
import importlib.util
import itertools
import json
import math
import os
import random
import re
import shutil
import signal
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

if not {"PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF"} & set(os.environ):  # read when CUDA starts, later
    os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"  # less fragmentation near a full card

# ==============================================================================================
# 1. Config: every knob, one place. Field help is the --help text.


def knob(default, help: str, choices: tuple | None = None):
    return field(default=default, metadata={"help": help, "choices": choices})


MASKS = ("s2t", "none", "high-entropy")


@dataclass
class Config:
    # model and data
    model: str = knob(
        "Qwen/Qwen3-1.7B-Base",
        "HF id or path; tiny: a random CPU model (P 8, 64 new tokens unless "
        "given); tiny-sft: tiny taught the answer format first (the CPU demo)",
    )
    dataset: str = knob("BytedTsinghua-SIA/DAPO-Math-17k", "Hub id, local .jsonl/.json/.parquet, or 'toy' (sums)")
    dataset_config: str | None = knob(None, "Hub dataset config name")
    split: str = knob("train", "dataset split (local files: train)")
    problem_key: str | None = knob(None, "column with the problem text")
    answer_key: str | None = knob(None, "column with the gold answer")
    prompt_format: str = knob("chat", "the tokenizer's chat template, or plain text", ("chat", "plain"))
    output_dir: str = knob("runs/stapo", "metrics, samples, checkpoints")
    resume: str | None = knob(None, "checkpoint folder to continue from")
    seed: int = knob(0, "seed of data order and sampling")
    device: str = knob("auto", "auto | cpu | cuda | cuda:N")
    precision: str = knob("auto", "auto: bf16 autocast on CUDA, fp32 on CPU", ("auto", "fp32", "bf16-autocast"))
    dist_timeout_min: int = knob(180, "torchrun: minutes a rank may wait for the others (long rollouts)")
    # sampling
    prompts_per_step: int = knob(32, "P: problems per step (paper: 256)")
    group_size: int = knob(8, "G: samples per problem")
    max_prompt_tokens: int = knob(1024, "problems with longer prompts are skipped")
    max_new_tokens: int = knob(4096, "response cap (paper: 15k)")
    temperature: float = knob(1.0, "sampling temperature")
    top_p: float = knob(1.0, "nucleus sampling")
    kv_cache_gb: float = knob(0.0, "KV-cache budget of one generate call in GB; 0: what the memory plan leaves free")
    # STAPO / S2T
    mask: str = knob("s2t", "s2t: STAPO; none: JustRL, DAPO, GRPO; high-entropy: 20-Entropy", MASKS)
    tau_p: float = knob(0.002, "probability below which a token of a correct answer is a candidate")
    q: float = knob(0.75, "entropy quantile over the candidates that sets tau_h")
    entropy_top: float = knob(0.2, "share of tokens kept by --mask high-entropy")
    # loss and optimisation
    loss_agg: str = knob("token", "token: mean over kept tokens (DAPO, STAPO); sequence: GRPO", ("token", "sequence"))
    eps_low: float = knob(0.2, "lower clip range")
    eps_high: float = knob(0.28, "upper clip range (clip-higher; GRPO: 0.2)")
    dual_clip: float = knob(3.0, "veRL's dual-clip bound on ratios of A < 0 tokens (0 = off)")
    steps: int = knob(200, "training steps in all, one rollout batch each (with --resume too: the total)")
    lr: float = knob(1e-6, "AdamW learning rate, constant after warm-up")
    warmup_steps: int = knob(10, "linear warm-up steps")
    weight_decay: float = knob(0.1, "AdamW weight decay")
    grad_clip: float = knob(1.0, "max gradient norm")
    mini_batches: int = knob(1, "PPO updates per rollout batch (1 = on-policy)")
    # memory
    micro_batch_tokens: int = knob(16384, "token budget of one forward/backward")
    logit_chunk: int = knob(256, "tokens per LM-head chunk (0: no chunking)")
    gradient_checkpointing: str = knob(
        "auto", "recompute the model body in backward; auto: if the plan needs it", ("auto", "on", "off")
    )
    gpu_memory_gb: float = knob(
        0.0, "memory to plan for; 0: what is free on the device (80 for --dry-run without a GPU)"
    )
    dry_run: bool = knob(False, "print the memory plan from the model's config alone and exit")
    gpus: int = knob(1, "GPUs to plan for with --dry-run (a torchrun run plans for its processes)")
    # logging and checkpoints
    save_every: int = knob(50, "checkpoint every N steps (and at the end)")
    report_to: str = knob(
        "none", "also send metrics.jsonl's keys to a tracker", ("none", "wandb", "trackio", "tensorboard")
    )
    log_samples: int = knob(4, "completions written to samples.jsonl per step")


TINY_DEFAULTS = {"prompts_per_step": 8, "max_new_tokens": 64}  # --model tiny: seconds per step on a CPU
TINY = ("tiny", "tiny-sft")  # random; then taught the answer format (teach_format): the CPU demo


# ==============================================================================================
# 2. The paper's math, on plain tensors.
# Shape legend: P prompts per step, G samples each, B = P*G, T completion tokens, V vocabulary,
# D hidden size.


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-6) -> torch.Tensor:
    """rewards (B,) -> advantages (B,): z-score inside each group of G samples of one prompt.
    A group whose rewards are all equal carries no signal and gets A = 0."""
    groups = rewards.float().view(-1, group_size)  # (P, G)
    mean, std = groups.mean(1, keepdim=True), groups.std(1, keepdim=True)  # (P, 1)
    return ((groups - mean) / (std + eps)).view(-1)  # (B,); std = 0 gives exactly 0


def _chunk_logp_entropy(hidden, weight, targets, temperature: float, with_entropy: bool):
    """hidden (n, D), weight (V, D), targets (n,) -> logp (n,), entropy (n,) or None."""
    logits = F.linear(hidden, weight).float()  # (n, V) fp32
    logprobs = logits.div_(temperature).log_softmax(-1)  # (n, V): the sampler's distribution (in place: no copy)
    logp = logprobs.gather(-1, targets[:, None]).squeeze(-1)  # (n,)
    if not with_entropy:
        return logp, None
    with torch.no_grad():
        entropy = -(logprobs.exp() * logprobs).sum(-1)  # (n,)  H = -sum_v pi(v) log pi(v), nats
    return logp, entropy


def token_logp(hidden, weight, targets, temperature: float, chunk: int, with_entropy: bool = False):
    """hidden (b, T, D) -> log p (b, T) of the sampled tokens, and entropy H (b, T) of each state.

    The LM head is applied chunk by chunk, so (b, T, V) fp32 logits never exist at once. With
    gradients on, each chunk is checkpointed: backward recomputes its logits, so training memory is
    O(chunk x V) instead of O(b x T x V). chunk <= 0 computes everything at once.
    """
    b, T, D = hidden.shape
    hidden, targets = hidden.reshape(b * T, D), targets.reshape(b * T)
    chunk = chunk if chunk > 0 else b * T
    recompute = torch.is_grad_enabled() and chunk < b * T
    logps, entropies = [], []
    for h, t in zip(hidden.split(chunk), targets.split(chunk), strict=True):
        if recompute:
            lp, ent = checkpoint(_chunk_logp_entropy, h, weight, t, temperature, with_entropy, use_reentrant=False)
        else:
            lp, ent = _chunk_logp_entropy(h, weight, t, temperature, with_entropy)
        logps.append(lp)
        entropies.append(ent)
    logp = torch.cat(logps).view(b, T)
    return logp, torch.cat(entropies).view(b, T) if with_entropy else None


class S2T(NamedTuple):
    spurious: torch.Tensor  # (B, T) bool
    n_candidates: int
    tau_h: float | None  # None when there are fewer than two candidates


def s2t_select(logp, entropy, advantages, completion_mask, tau_p: float = 0.002, q: float = 0.75) -> S2T:
    """STAPO's Silencing Spurious Tokens (S2T) rule, arXiv 2602.15620v4, Sec. 4.

    The gradient norm on a token's logits is bounded below by |w|^2 (1 - 2p + e^{-H}): it is
    largest when the sampled token was unlikely (p small) while the model was confident (H small).
    Inside a correct answer (A > 0) such a token gets a large push, although it is most likely noise
    that the answer survived, not the reason it is right. Those are the spurious tokens: candidates
    C = {A > 0, p < tau_p} whose H is below tau_h, the q-quantile of H over C of the mini-batch.
    All inputs are (B, T) except advantages (B,); p and H come from the policy at the start of the
    mini-batch, without gradient.
    """
    # STAPO: candidates are the unlikely tokens of correct answers
    candidates = (advantages[:, None] > 0) & completion_mask & (logp.exp() < tau_p)  # (B, T)
    # STAPO: tau_h comes from the candidates only, of the whole mini-batch (all ranks under torchrun)
    pool = all_cat(entropy[candidates].float())  # (|C|,)
    if pool.numel() < 2:  # an empty or single-element C masks nothing (and quantile needs two)
        return S2T(torch.zeros_like(candidates), pool.numel(), None)
    tau_h = torch.quantile(pool, q).item()  # linear interpolation
    return S2T(candidates & (entropy < tau_h), pool.numel(), tau_h)  # (B, T)  # STAPO: H strictly below


def s2t_mask(logp, entropy, advantages, completion_mask, tau_p: float = 0.002, q: float = 0.75) -> torch.Tensor:
    """(B, T) bool, True where a token is spurious: s2t_select without its statistics."""
    return s2t_select(logp, entropy, advantages, completion_mask, tau_p, q).spurious


def high_entropy_keep(entropy, completion_mask, top: float = 0.2) -> torch.Tensor:
    """20-Entropy baseline: keep the tokens whose H is in the top `top` share of the mini-batch."""
    values = all_cat(entropy[completion_mask].float())  # (N,) of the whole mini-batch
    k = max(1, math.ceil(top * values.numel()))
    threshold = values.topk(k).values.min()  # topk, not quantile: no 16M-element limit
    return completion_mask & (entropy >= threshold)  # (B, T)


def loss_mask(logp, entropy, advantages, completion_mask, cfg: Config) -> tuple[torch.Tensor, S2T | None]:
    """keep (B, T): the tokens whose surrogate enters the loss, for STAPO and its baselines."""
    if cfg.mask == "s2t":  # STAPO: I = completion_mask and not spurious
        s2t = s2t_select(logp, entropy, advantages, completion_mask, cfg.tau_p, cfg.q)
        return completion_mask & ~s2t.spurious, s2t
    if cfg.mask == "high-entropy":
        return high_entropy_keep(entropy, completion_mask, cfg.entropy_top), None
    return completion_mask, None  # JustRL / DAPO / GRPO: every completion token


def clipped_surrogate(ratio, advantages, eps_low: float, eps_high: float, dual_clip: float = 0.0):
    """s = min(rho A, clip(rho, 1-eps_low, 1+eps_high) A) (B, T), and where a clip is active (B, T).

    dual_clip c > 1 also bounds s below at c*A for A < 0, so ratios above c stop growing the loss:
    veRL's default (clip_ratio_c = 3), a framework detail of the paper's runs, not part of STAPO.
    """
    adv = advantages[:, None]  # (B, 1)
    surrogate = torch.minimum(ratio * adv, ratio.clamp(1 - eps_low, 1 + eps_high) * adv)  # (B, T)
    if dual_clip > 0:
        surrogate = torch.where(adv < 0, torch.maximum(surrogate, dual_clip * adv), surrogate)  # (B, T)
    clipped = surrogate != ratio * adv  # (B, T): a constant was taken, so this token has no gradient
    return surrogate, clipped


def policy_loss(logp, old_logp, advantages, keep, num_kept, eps_low: float = 0.2, eps_high: float = 0.28, *,
                dual_clip: float = 0.0, loss_agg: str = "token"):  # fmt: skip
    """L = -sum(keep * s) / num_kept, with s the clipped surrogate of each token.

    num_kept is the loss denominator of the whole mini-batch, not of this micro-batch: every
    micro-batch is one slice of the same sum, so the gradient does not depend on the split.
    loss_agg "token": num_kept counts the mini-batch's kept tokens (DAPO, STAPO).
    loss_agg "sequence" (GRPO): each answer's mean over its kept tokens, summed, and num_kept counts
    the answers of the mini-batch that keep at least one token.
    """
    log_ratio = torch.where(keep, logp - old_logp, 0.0)  # (B, T); 0 where dropped: no inf * 0
    surrogate, _ = clipped_surrogate(log_ratio.exp(), advantages, eps_low, eps_high, dual_clip)  # (B, T)
    kept = torch.where(keep, surrogate, 0.0)  # (B, T)  # STAPO: silenced tokens leave the numerator
    if loss_agg == "sequence":
        kept = kept.sum(1) / keep.sum(1).clamp(min=1)  # (B,): per-answer mean
    return -kept.sum() / max(float(num_kept), 1.0)  # scalar; 0, not NaN, if nothing is kept


def loss_denominator(keep, loss_agg: str = "token") -> int:
    """num_kept of policy_loss for a whole mini-batch's keep (B, T), summed over ranks."""
    # STAPO: silenced tokens leave the denominator too, so the loss is renormalised over the rest
    return int(all_sum([float(keep.sum() if loss_agg == "token" else keep.any(1).sum())])[0])


# ==============================================================================================
# 3. One training step: rollouts, rewards, advantages, then the PPO updates.


def train_step(model, tokenizer, optimizer, problems: list[dict], step: int, cfg: Config,
               kv_cache_bytes: float | None = None) -> tuple[dict, dict]:  # fmt: skip
    """One rollout batch and its updates. Returns (metrics, records for the jsonl files)."""
    G = cfg.group_size
    # 1. rollouts: every problem G times
    t0 = time.time()
    examples = my_share(prompts_for_step(problems, step, cfg.prompts_per_step, cfg.seed), cfg.mini_batches)
    prompts = [e["prompt_ids"] for e in examples for _ in range(G)]  # B prompts
    rollouts = generate(model, tokenizer, prompts, cfg, f"step {step + 1} rollouts", kv_cache_bytes)
    texts = [
        tokenizer.decode(c[m], skip_special_tokens=True)
        for c, m in zip(rollouts.completions, rollouts.completion_mask, strict=True)
    ]
    # 2. rewards, 3. advantages
    golds = [e["answer"] for e in examples for _ in range(G)]
    rewards = torch.tensor([float(verify(t, g)) for t, g in zip(texts, golds, strict=True)])  # (B,)
    advantages = group_advantages(rewards, G)  # (B,)
    gen_s = time.time() - t0

    # 4. p and H under the rollout policy, then the S2T mask and 5. the clipped updates
    t0 = time.time()
    old_logp, entropy = score(model, rollouts, list(range(len(prompts))), cfg)  # (B, T) each
    logp_s = time.time() - t0
    stats, silenced = ppo_update(model, optimizer, rollouts, old_logp, entropy, advantages, cfg)
    train_s = time.time() - t0

    # Metrics of the whole batch: sums over every rank (in one process, the sums of this one).
    n, reward, tokens, H, truncated, zero_std, spurious, clipped, kept, loss = all_sum([
        len(prompts), rewards.sum(), rollouts.completion_mask.sum(), entropy[rollouts.completion_mask].sum(),
        rollouts.truncated.sum(), (rewards.view(-1, G).std(1) == 0).sum(), stats["n_spurious"], stats["clipped"],
        stats["n_kept_tokens"], stats["loss"],
    ])  # fmt: skip
    metrics = {
        "step": step + 1, "steps": cfg.steps, "samples": int(n), "reward": reward / n,
        "frac_zero_std": zero_std * G / n, "len_mean": tokens / n, "truncated_frac": truncated / n,
        "entropy": H / max(1, tokens), "n_candidates": stats["n_candidates"], "n_spurious": int(spurious),
        "spurious_frac": spurious / max(1, tokens),
        "tau_h": sum(stats["tau_h"]) / len(stats["tau_h"]) if stats["tau_h"] else None,
        "clip_frac": clipped / max(1, kept), "loss": loss,
        "grad_norm": sum(stats["grad_norm"]) / len(stats["grad_norm"]),
        "lr": optimizer.param_groups[0]["lr"], "gen_s": gen_s, "logp_s": logp_s, "train_s": train_s,
    }  # fmt: skip
    records = {
        "samples": [
            {"step": step + 1, "problem": examples[i // G]["problem"], "gold": golds[i],
             "reward": rewards[i].item(), "completion": texts[i]}
            for i in range(min(cfg.log_samples, len(texts)))
        ],
        "spurious": all_records([inspect_token(s, rollouts, tokenizer, step + 1) for s in silenced]),
    }  # fmt: skip
    return metrics, records


def ppo_update(model, optimizer, rollouts, old_logp, entropy, advantages, cfg: Config):
    """The mini-batch updates of one step. Returns step statistics and the silenced tokens."""
    B = len(rollouts.prompts)
    stats = {"n_candidates": 0, "n_spurious": 0, "tau_h": [], "clipped": 0, "n_kept_tokens": 0, "loss": 0.0,
             "grad_norm": []}  # fmt: skip
    silenced = []
    rows_per_mini_batch = B // cfg.mini_batches
    device = next(model.parameters()).device
    for k in range(cfg.mini_batches):
        rows = list(range(k * rows_per_mini_batch, (k + 1) * rows_per_mini_batch))
        # p and H from the policy at the start of this mini-batch (= the rollout policy for the first).
        logp_now, entropy_now = (old_logp, entropy) if k == 0 else score(model, rollouts, rows, cfg)
        completion_mask = torch.zeros_like(rollouts.completion_mask)  # (B, T): this mini-batch's tokens only
        completion_mask[rows] = rollouts.completion_mask[rows]
        keep, s2t = loss_mask(logp_now, entropy_now, advantages, completion_mask, cfg)  # (B, T)
        num_kept = loss_denominator(keep, cfg.loss_agg)  # of the whole mini-batch, never of a micro-batch
        if s2t is not None:
            stats["n_candidates"] += s2t.n_candidates
            stats["n_spurious"] += int(s2t.spurious.sum())
            stats["tau_h"] += [s2t.tau_h] if s2t.tau_h is not None else []
            for i, t in s2t.spurious.nonzero().tolist():
                silenced.append({"row": i, "t": t, "p": math.exp(logp_now[i, t]), "H": float(entropy_now[i, t]),
                                 "A": float(advantages[i]), "tau_h": s2t.tau_h})  # fmt: skip

        for mb in micro_batches(rollouts, rows, cfg.micro_batch_tokens):
            forward_rows = mb or rows[:1]  # an empty micro-batch keeps this rank in step (FSDP2): loss 0
            logp, _ = sequence_logp(model, rollouts, forward_rows, cfg)  # (b, T')
            T = logp.shape[1]
            selected = (old_logp[forward_rows, :T], keep[forward_rows, :T] & bool(mb), advantages[forward_rows])
            old, kept, adv = (x.to(device) for x in selected)
            loss = policy_loss(logp, old, adv, kept, num_kept, cfg.eps_low, cfg.eps_high,
                               dual_clip=cfg.dual_clip, loss_agg=cfg.loss_agg)  # fmt: skip
            loss.backward()
            with torch.no_grad():
                _, clipped = clipped_surrogate((logp - old).exp(), adv, cfg.eps_low, cfg.eps_high, cfg.dual_clip)
                stats["clipped"] += int((clipped & kept).sum())
            stats["loss"] += loss.item() / cfg.mini_batches
        stats["n_kept_tokens"] += int(keep.sum())
        stats["grad_norm"].append(optimizer_step(model, optimizer, cfg.grad_clip))
    return stats, silenced


def optimizer_step(model, optimizer, grad_clip: float) -> float:
    """Clip the gradient norm, step, and free the gradients (their memory serves generation).
    Returns the norm before clipping."""
    norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return norm


@dataclass
class Rollouts:
    prompts: list[torch.Tensor]  # B prompt-id tensors (each prompt repeated G times)
    completions: torch.Tensor  # (B, T) sampled ids, pad after the end
    completion_mask: torch.Tensor  # (B, T) bool: up to and including the first EOS
    truncated: torch.Tensor  # (B,) bool: no EOS within max_new_tokens

    def lengths(self) -> list[int]:
        """Prompt + completion tokens of every sequence, for token-budget micro-batches."""
        return [len(p) + n for p, n in zip(self.prompts, self.completion_mask.sum(1).tolist(), strict=True)]


@torch.no_grad()
def generate(model, tokenizer, prompts: list[torch.Tensor], cfg: Config, desc: str = "rollouts",
             kv_cache_bytes: float | None = None) -> Rollouts:  # fmt: skip
    """One sampled completion per prompt, in as few generate calls as the KV-cache budget allows
    (kv_cache_bytes; default --kv-cache-gb, else what the memory plan leaves free)."""
    from transformers import GenerationConfig

    device = next(model.parameters()).device
    eos = eos_token_ids(model, tokenizer)
    gen_config = GenerationConfig(
        do_sample=True, temperature=cfg.temperature, top_p=cfg.top_p, top_k=0, max_new_tokens=cfg.max_new_tokens,
        eos_token_id=eos, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    if not kv_cache_bytes:  # --kv-cache-gb, or what the memory plan leaves free on this device
        kv_cache_bytes = cfg.kv_cache_gb * 1e9 or plan_memory(
            model.config, cfg, rank_and_world()[1], device_memory(cfg, device), device.type)["kv_cache"]  # fmt: skip
    chunk = sequences_per_generate(model, max(len(p) for p in prompts), cfg, kv_cache_bytes)
    was_training = model.training
    model.eval()
    completions = []
    calls = math.ceil(len(prompts) / chunk)
    progress = DecodeProgress(f"{desc} ({len(prompts)} sequences, {calls} calls)", calls, cfg.max_new_tokens)
    with progress, unsharded(model):  # FSDP2: whole weights (bf16 with autocast) on every rank, no collective per token
        # bf16 path: sample from a bf16 copy, not under autocast, so keys and values are both bf16 (Qwen3's
        # fp32 q/k-norm weights would make autocast's keys fp32) and no decode step pays for casts.
        bf16_copy_needed = uses_bf16(cfg, device) and next(model.parameters()).dtype != torch.bfloat16
        sampler = bf16_copy(model) if bf16_copy_needed else model
        for start in range(0, len(prompts), chunk):
            prompt_ids, prompt_mask = left_pad(prompts[start : start + chunk], tokenizer.pad_token_id)
            out = sampler.generate(input_ids=prompt_ids.to(device), attention_mask=prompt_mask.to(device),
                                   generation_config=gen_config, synced_gpus=False, streamer=progress)  # fmt: skip
            # out: (b, L + new tokens)
            completions += list(out[:, prompt_ids.shape[1] :].cpu())
        del sampler  # the copy lives for one call of generate: its memory serves the update
    model.train(was_training)

    # Cut each completion after its first EOS, which stays in (it is the answer's last action).
    width = max(1, max(len(c) for c in completions))
    tokens = torch.full((len(completions), width), tokenizer.pad_token_id, dtype=torch.long)  # (B, T)
    completion_mask = torch.zeros((len(completions), width), dtype=torch.bool)  # (B, T)
    truncated = torch.zeros(len(completions), dtype=torch.bool)  # (B,)
    eos_t = torch.tensor(eos)
    for row, c in enumerate(completions):
        hits = torch.isin(c, eos_t).nonzero()
        n = int(hits[0]) + 1 if len(hits) else len(c)
        truncated[row] = len(hits) == 0
        tokens[row, :n] = c[:n]
        completion_mask[row, :n] = True
    return Rollouts(prompts, tokens, completion_mask, truncated)


def sequence_logp(model, rollouts: Rollouts, rows: list[int], cfg: Config, with_entropy: bool = False):
    """logp (b, T) of the sampled tokens of `rows` (and entropy), T = their longest completion.

    Layout: [left pad | prompt | completion | right pad]; position ids count real tokens only,
    exactly as generate() numbered the left-padded prompt, so training log-probs equal sampling ones.
    """
    device = next(model.parameters()).device
    T = int(rollouts.completion_mask[rows].sum(1).max())
    prompt_ids, prompt_mask = left_pad([rollouts.prompts[r] for r in rows], 0)
    completions = rollouts.completions[rows, :T]  # (b, T)
    input_ids = torch.cat([prompt_ids, completions], 1).to(device)  # (b, L)
    attention_mask = torch.cat([prompt_mask, rollouts.completion_mask[rows, :T].long()], 1).to(device)  # (b, L)
    position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)  # (b, L)
    with autocast(cfg, device):
        body = getattr(model, "sharded_body", model.base_model)  # under FSDP2, the body with the root's gather
        hidden = body(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        ).last_hidden_state  # (b, L, D)
        hidden = hidden[:, prompt_ids.shape[1] - 1 : -1]  # (b, T, D): the state that predicts each completion token
        # Cast the head once per micro-batch: under autocast each checkpointed chunk would cast it again,
        # forward and backward (26 casts of a 151,936 x 2,048 matrix for 24 chunks).
        weight = model.get_output_embeddings().weight  # (V, D)
        weight = weight.to(torch.bfloat16) if uses_bf16(cfg, device) else weight
        return token_logp(hidden, weight, completions.to(device), cfg.temperature, cfg.logit_chunk, with_entropy)


def micro_batches(rollouts: Rollouts, rows: list[int], token_budget: int) -> list[list[int]]:
    """Split rows into micro-batches whose padded size (rows x longest) fits token_budget.
    Sorting by length first keeps padding small. Under torchrun every forward is collective, so each
    rank gets as many micro-batches as the rank with the most: empty ones stand for the difference."""
    lengths = rollouts.lengths()
    batches, current = [], []
    for r in sorted(rows, key=lambda r: lengths[r]):
        if current and (len(current) + 1) * lengths[r] > token_budget:
            batches.append(current)
            current = []
        current.append(r)
    batches += [current] if current else []
    return batches + [[] for _ in range(max(all_records([len(batches)])) - len(batches))]


@torch.no_grad()
def score(model, rollouts: Rollouts, rows: list[int], cfg: Config):
    """logp and entropy (B, T) of the given rows under the current policy, without gradient."""
    B, T = rollouts.completions.shape
    logp, entropy = torch.zeros(B, T), torch.zeros(B, T)
    for mb in micro_batches(rollouts, rows, cfg.micro_batch_tokens):
        lp, ent = sequence_logp(model, rollouts, mb or rows[:1], cfg, with_entropy=True)  # empty: keeps in step
        if mb:
            logp[mb, : lp.shape[1]] = lp.cpu()
            entropy[mb, : ent.shape[1]] = ent.cpu()
    return logp, entropy


# ==============================================================================================
# 4. The loop and main


def build_optimizer(model, cfg: Config):
    """AdamW with a linear warm-up to a constant learning rate (the paper's schedule)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / max(1, cfg.warmup_steps)))
    return optimizer, scheduler


def train(cfg: Config):
    device = start_distributed(cfg)  # under torchrun; otherwise just the device
    rank, world = rank_and_world()
    plan = plan_or_stop(load_model_config(cfg.resume or cfg.model), cfg, device, world)
    same_run = check_run_folder(cfg)  # before anything slow, and before anything is written
    torch.manual_seed(cfg.seed + rank)  # every rank samples its own answers
    random.seed(cfg.seed + rank)
    tokenizer = load_tokenizer(cfg.resume or cfg.model)
    problems = load_problems(cfg, tokenizer)
    if world == 1:
        model = load_model(cfg.resume or cfg.model, device, tokenizer, cfg.seed)
    else:  # torchrun: sharded as it loads, and only rank 0 reads the whole model
        model = load_sharded_model(cfg.resume or cfg.model, device, tokenizer, cfg.seed, uses_bf16(cfg, device))
    if plan["gradient_checkpointing"]:
        model.activation_checkpointing_enable()
    model.train()
    optimizer, scheduler = build_optimizer(model, cfg)
    start = restore_trainer_state(cfg, model, optimizer, scheduler) if cfg.resume else 0
    out = open_run_folder(cfg, same_run) if rank == 0 else Path(cfg.output_dir)
    tracker = open_tracker(cfg if rank == 0 else dataclasses.replace(cfg, report_to="none"), dataclasses.asdict(cfg))

    # Ctrl-C (or SIGTERM) once: finish this step, save, exit. Twice: stop at once.
    stop = []

    def request_stop(signum, frame):
        if stop:
            raise KeyboardInterrupt
        stop.append(signum)
        tqdm.write("stopping after this step to save a checkpoint (Ctrl-C again to quit now)")

    previous = {s: signal.signal(s, request_stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        for step in range(start, cfg.steps):
            metrics, records = train_step(model, tokenizer, optimizer, problems, step, cfg, plan["kv_cache"])
            scheduler.step()
            if rank == 0:  # one writer of the log files
                tqdm.write(log_line(metrics))
                append_jsonl(out / "metrics.jsonl", [metrics])
                append_jsonl(out / "samples.jsonl", records["samples"])
                append_jsonl(out / "spurious.jsonl", records["spurious"])
                tracker.log(metrics, metrics["step"])
            stopping = all_sum([len(stop)])[0] > 0  # every rank stops after the same step
            if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps or stopping:
                print(f"saved {save_checkpoint(model, tokenizer, optimizer, scheduler, cfg, step + 1)}")
            if stopping:
                break
    finally:
        tracker.finish()
        for s, handler in previous.items():
            signal.signal(s, handler)
    return model


def plan_or_stop(model_config, cfg: Config, device: torch.device, world_size: int = 1) -> dict:
    """The memory plan in one line; stop now, before generating, if its peak exceeds the device."""
    device_bytes = device_memory(cfg, device)
    plan = plan_memory(model_config, cfg, world_size, device_bytes, device.type)
    allocator = os.environ.get("PYTORCH_ALLOC_CONF") or os.environ.get("PYTORCH_CUDA_ALLOC_CONF")
    where = f" | {device_bytes / 1e9:.1f} GB free on {device}, allocator {allocator}" if device.type == "cuda" else ""
    print(plan_summary(plan) + where)
    if plan["peak"] > plan["budget"]:
        fixes = fixes_that_fit(model_config, cfg, world_size, device_bytes, device.type)
        sys.exit(f"the planned peak, {plan['peak'] / 1e9:.1f} GB, exceeds {plan['budget'] / 1e9:.1f} GB "
                 f"({HEADROOM:.0%} of {device_bytes / 1e9:.1f} GB on {device}); {fixes}; add --dry-run to see "
                 "the whole plan")  # fmt: skip
    return plan


def parse_args(argv=None) -> Config:
    """CLI flags from the dataclass. With --resume, the run's saved config is the base."""
    epilog = "curves of finished runs: python plot.py RUN_DIR [RUN_DIR ...]"
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], argument_default=argparse.SUPPRESS, epilog=epilog
    )
    for f in dataclasses.fields(Config):
        flag = "--" + f.name.replace("_", "-")
        choices = f.metadata["choices"]
        help_text = f"{f.metadata['help']}{' (' + ' | '.join(choices) + ')' if choices else ''} (default: {f.default})"
        if f.type is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, help=help_text)
        else:
            kind = {int: int, float: float}.get(f.type, str)
            parser.add_argument(flag, type=kind, choices=choices, help=help_text)
    parser.error = lambda message: parser.exit(2, f"stapo.py: error: {message}\n")  # one line; --help has usage
    given = vars(parser.parse_args(argv))
    base = {}
    if "resume" in given:  # the checkpoint's config, then every flag given on top of it
        ckpt = Path(given["resume"])
        if not ckpt.is_dir():
            parser.error(f"--resume {ckpt}: no such folder")
        if not (ckpt / "trainer_state.pt").exists() or not (ckpt / "stapo_config.json").exists():
            parser.error(f"--resume {ckpt}: not a checkpoint folder (no trainer_state.pt and stapo_config.json)")
        if checkpoint_step(ckpt) < 0:
            parser.error(f"--resume {ckpt}: checkpoint folders are named step-NNNNNN, as this trainer writes them")
        try:
            base = json.loads((ckpt / "stapo_config.json").read_text())
            assert isinstance(base, dict) and "model" in base
        except (json.JSONDecodeError, UnicodeDecodeError, AssertionError):
            parser.error(f"--resume {ckpt}: its stapo_config.json is damaged; resume from another checkpoint")
        saved, world = base.get("world_size", 1), int(os.environ.get("WORLD_SIZE", 1))
        if saved != world:
            parser.error(f"--resume {ckpt}: written by {saved} process(es), resumed by {world}; an exact resume "
                         f"needs the same number: torchrun --nproc_per_node {saved}")  # fmt: skip
        base = {k: v for k, v in base.items() if k in {f.name for f in dataclasses.fields(Config)}}
        if given.get("model", base["model"]) != base["model"]:
            parser.error(f"--model {given['model']}: {ckpt} holds weights trained from {base['model']}, and those "
                         "are what resumes; drop --model, or start a new run")  # fmt: skip
        base["output_dir"] = str(ckpt.parent)  # the checkpoint's own run, unless --output-dir branches off
        if given.get("steps", base["steps"]) <= checkpoint_step(ckpt):
            parser.error(f"--steps {given.get('steps', base['steps'])}: {ckpt} is at step {checkpoint_step(ckpt)} "
                         "already, and --steps counts all the steps of the run; give more")  # fmt: skip
    defaults = {}
    if given.get("model", base.get("model")) in TINY:  # CPU-sized unless set: seconds per step, not minutes
        defaults = TINY_DEFAULTS
    cfg = Config(**{**defaults, **base, **given})
    for problem in config_errors(cfg):
        parser.error(problem)
    return cfg


def config_errors(cfg: Config) -> list[str]:
    """Every flag checked before anything is loaded: each error names the flag, its value, what is allowed."""
    rules = [
        ("prompts_per_step", cfg.prompts_per_step >= 1, "at least 1"),
        ("group_size", cfg.group_size >= 2, "at least 2: advantages compare the samples of a group"),
        ("max_prompt_tokens", cfg.max_prompt_tokens >= 1, "at least 1"),
        ("max_new_tokens", cfg.max_new_tokens >= 1, "at least 1"),
        ("temperature", cfg.temperature > 0, "above 0"),
        ("top_p", 0 < cfg.top_p <= 1, "in (0, 1]"),
        ("kv_cache_gb", cfg.kv_cache_gb >= 0, "at least 0 (0: sized by the memory plan)"),
        ("gpu_memory_gb", cfg.gpu_memory_gb >= 0, "at least 0 (0: the device's own)"),
        ("gpus", cfg.gpus >= 1, "at least 1"),
        ("dist_timeout_min", cfg.dist_timeout_min >= 1, "at least 1"),
        ("tau_p", 0 < cfg.tau_p < 1, "a probability in (0, 1); the paper uses 0.002"),
        ("q", 0 <= cfg.q <= 1, "a quantile in [0, 1]; the paper uses 0.75"),
        ("entropy_top", 0 < cfg.entropy_top <= 1, "a share in (0, 1]"),
        ("eps_low", 0 <= cfg.eps_low < 1, "in [0, 1)"),
        ("eps_high", cfg.eps_high >= 0, "at least 0"),
        ("dual_clip", cfg.dual_clip == 0 or cfg.dual_clip > 1, "0 (off) or above 1; veRL uses 3"),
        ("steps", cfg.steps >= 1, "at least 1"),
        ("lr", cfg.lr > 0, "above 0"),
        ("warmup_steps", cfg.warmup_steps >= 0, "at least 0"),
        ("weight_decay", cfg.weight_decay >= 0, "at least 0"),
        ("grad_clip", cfg.grad_clip > 0, "above 0"),
        ("mini_batches", cfg.mini_batches >= 1, "at least 1"),
        ("micro_batch_tokens", cfg.micro_batch_tokens >= 1, "at least 1"),
        ("logit_chunk", cfg.logit_chunk >= 0, "at least 0 (0: no chunking)"),
        ("save_every", cfg.save_every >= 1, "at least 1"),
        ("log_samples", cfg.log_samples >= 0, "at least 0"),
        ("device", re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", cfg.device) is not None, "auto, cpu, cuda, cuda:N or mps"),
    ]
    errors = [
        f"--{name.replace('_', '-')} {getattr(cfg, name)}: must be {allowed}" for name, ok, allowed in rules if not ok
    ]
    world = int(os.environ.get("WORLD_SIZE", 1))  # torchrun's processes: each holds whole groups of every mini-batch
    if cfg.mini_batches >= 1 and cfg.prompts_per_step % (cfg.mini_batches * world):
        errors.append(f"--prompts-per-step {cfg.prompts_per_step} must be divisible by --mini-batches "
                      f"{cfg.mini_batches}" + (f" x {world} processes" if world > 1 else ""))  # fmt: skip
    for f in dataclasses.fields(Config):  # choices also when a saved config is the source
        value, choices = getattr(cfg, f.name), f.metadata["choices"]
        if choices and value not in choices:
            errors.append(f"--{f.name.replace('_', '-')} {value}: must be one of {', '.join(choices)}")
        if f.type is float and not math.isfinite(value):
            errors.append(f"--{f.name.replace('_', '-')} {value}: must be a finite number")
    errors += [e for e in [device_error(cfg.device)] if e]
    if cfg.report_to != "none" and importlib.util.find_spec(cfg.report_to) is None:
        errors.append(f"--report-to {cfg.report_to} needs the {cfg.report_to} package: pip install {cfg.report_to}")
    return errors


def device_error(device: str) -> str | None:
    """Why --device cannot run on this machine, if it cannot."""
    if device.startswith("cuda") and not torch.cuda.is_available():
        return f"--device {device}: this machine or torch build has no CUDA device; use --device cpu (or auto)"
    if device.startswith("cuda:") and int(device[5:]) >= torch.cuda.device_count():
        return f"--device {device}: there are {torch.cuda.device_count()} CUDA devices"
    if device == "mps" and not torch.backends.mps.is_available():
        return "--device mps: this machine or torch build has no MPS device; use --device cpu (or auto)"
    return None


def main(argv=None):
    cfg = parse_args(argv)
    quiet_libraries()
    if cfg.dry_run:
        return dry_run(cfg)
    try:
        train(cfg)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def dry_run(cfg: Config):
    """Print the memory plan of --model from its config.json alone: no weights, no GPU needed."""
    device = torch.device("cuda") if torch.cuda.is_available() else None
    device_bytes = device_memory(cfg, device) if device else (cfg.gpu_memory_gb or 80) * 1e9
    model_config = load_model_config(cfg.model)
    plan = plan_memory(model_config, cfg, cfg.gpus, device_bytes)
    print(format_plan(plan, model_config, cfg))
    if plan["peak"] > plan["budget"]:
        print(f"does not fit; {fixes_that_fit(model_config, cfg, cfg.gpus, device_bytes, 'cuda')}")


# ==============================================================================================
# Appendix. Support code: the verifier, data and prompt, models and devices, checkpoints and logs.
# ----------------------------------------------------------------------------------------------
# A. Reward: a regex verifier. The answer is the content of the last \boxed{}; both sides are
# normalised, then compared as strings, as numbers, as tuples/intervals, then as unordered lists.

MAX_ANSWER_CHARS = 2000  # longer answers are no answer: keeps every call bounded in time


def extract_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} (or \\fbox{...}, \\boxed 5); None if absent or unbalanced."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    rest = text[start + (6 if text.startswith("\\boxed", start) else 5) :]
    body = rest.lstrip()
    if not body.startswith("{"):
        m = re.match(r"\s+([^\s$]+)", rest)  # \boxed 5
        return m.group(1) if m else None
    depth = 0
    for i, char in enumerate(body[: MAX_ANSWER_CHARS + 2]):
        depth += (char == "{") - (char == "}")
        if depth == 0:
            return body[1:i]
    return None


# LaTeX commands are read whole: a backslash and all the letters after it, or a backslash and one other
# character. So \le never matches inside \leq or \left, \left never eats the start of \leftarrow, and no
# entry of this table depends on the order of the others (a plain str.replace of \ge turns \geq into >=q).
_COMMANDS = {
    "left": "", "right": "", "left.": "", "right.": "", "bigl": "", "bigr": "", "Bigl": "", "Bigr": "",
    "displaystyle": "", "dfrac": "\\frac", "tfrac": "\\frac", "cfrac": "\\frac", "lbrace": "{", "rbrace": "}",
    "le": "<=", "leq": "<=", "leqq": "<=", "leqslant": "<=", "lt": "<",
    "ge": ">=", "geq": ">=", "geqq": ">=", "geqslant": ">=", "gt": ">", "ne": "!=", "neq": "!=",
    "circ": "", "degree": "", "%": "", "$": "", "{": "{", "}": "}",
    "!": "", ",": "", ";": "", ":": "", " ": " ", "quad": " ", "qquad": " ",
}  # fmt: skip
_COMMAND = re.compile(r"\\(left\.|right\.|[a-zA-Z]+|.)", re.S)  # "\\" (a matrix row break) is read as one
_DEGREES = re.compile(r"\^ *(?:\{ *\\circ *\}|\\circ(?![a-zA-Z]))")
_SYMBOLS = [("≤", "<="), ("≥", ">="), ("≠", "!="), ("−", "-"), ("°", ""), ("%", ""), ("$", ""), ("~", " ")]
_TEXT = r"\\(?:text|textnormal|textrm|textup|textsf|textbf|textit|mathrm|mathbf|mathit|mathsf|mbox|operatorname)"
_UNIT_TEXT = re.compile(rf"(?<=[\d}}])\s*{_TEXT}\{{\s*[a-zA-Z][a-zA-Z ]*\}}(?:\^\{{?\d\}}?)?\s*$")
_WRAPPER = re.compile(rf"{_TEXT}\{{([^{{}}]*)\}}")
_UNIT_WORDS = re.compile(r"(?<=[\d}])(?:\s+[a-zA-Z]+(?:\^\d)?)+\s*$")
_AND = re.compile(r",? ?(?<![a-zA-Z\\])and(?![a-zA-Z]) ?")  # 6 and 8, 6, 8, and 9: list separators
# A left side that only names the answer: x, a_{n}, \theta, f(x), g(2), (p,q), \angle ABC; then = or \in.
_SYMBOL = r"(?:[a-zA-Z]|\\[a-zA-Z]+)(?:_(?:\{[^{}]*\}|[a-zA-Z0-9]+)|')*"  # one way to split: no backtracking
_ARGS = rf"\((?:-?\d+|{_SYMBOL})(?: ?, ?(?:-?\d+|{_SYMBOL}))*\)"
_NAME = rf"(?:{_SYMBOL}(?: ?{_ARGS})?|\({_SYMBOL}(?: ?, ?{_SYMBOL})+\)|(?:m ?)?\\angle ?[A-Z]+)"
_RELATION = re.compile(r"=|\\in(?![a-zA-Z])")
_LEFT_SIDE = re.compile(rf"^{_NAME} ?(?:{_RELATION.pattern}) ?")
# Thousands separators: 1,234 and 1,234,567 (groups of exactly three digits, no space after the comma, no
# leading 0). Checked before spaces are removed, so the list "32, 349" never becomes 32349.
_THOUSANDS = re.compile(r"[+-]?[1-9]\d{0,2}(?:,\d{3})+(?:\.\d+)?")
_NUM = r"[+-]?(?:\d+\.?\d*|\.\d+)"
# Work units per answers_match call. A unit (one character parsed, or 1/20 of a comparison) took about 60 ns
# here, so a call stays under ~7 ms; real answers use a few hundred units.
MATCH_BUDGET = 100_000


def _balanced(s: str) -> bool:
    depth = 0
    for char in s:
        depth += (char == "{") - (char == "}")
        if depth < 0:
            return False
    return depth == 0


@functools.lru_cache(maxsize=65536)
def normalize_answer(answer: str) -> str | None:
    """Canonical form of an answer (gold or predicted); None if it is empty or unusable. The steps run in order."""
    s = answer.strip()
    if "\\boxed" in s or "\\fbox" in s:  # a gold given as \boxed{...}
        s = extract_boxed(s) or ""
    if not s or len(s) > MAX_ANSWER_CHARS or not _balanced(s):
        return None
    s = _DEGREES.sub("", s.replace("{,}", ","))  # {,} before \{ and \} become braces; ^\circ before \circ
    s = _COMMAND.sub(lambda m: _COMMANDS.get(m[1], m[0]), s)
    for old, new in _SYMBOLS:  # after the commands, so that \$ and \% are gone before $ and %
        s = s.replace(old, new)
    s = _UNIT_TEXT.sub("", s)  # 5\text{ cm}^2 -> 5
    for _ in range(3):  # \text{\textbf{x}} -> x
        s = _WRAPPER.sub(r"\1", s)
    s = _AND.sub(",", " ".join(s.split()))  # spaces collapsed to one: 6 \text{ and } 8 -> 6,8
    s = _UNIT_WORDS.sub("", s.rstrip("."))  # 10 degrees -> 10
    if len(_RELATION.findall(s)) == 1:  # f(x) = 5 -> 5, x \in [1,2] -> [1,2], but x+y = 5 stays
        s = _LEFT_SIDE.sub("", s)
    if _THOUSANDS.fullmatch(s.strip()):  # spaces still present here
        s = s.replace(",", "")
    s = re.sub(r"\s+", "", s).rstrip(".")
    s = re.sub(r"\\frac(\d)(\d)", r"\\frac{\1}{\2}", s)  # \frac12 -> \frac{1}{2}
    s = re.sub(r"\\frac\{([^{}]*)\}(\d)", r"\\frac{\1}{\2}", s)  # \frac{1}2
    s = re.sub(r"\\frac(\d)\{", r"\\frac{\1}{", s)  # \frac1{2}
    s = re.sub(r"\\sqrt(\d+)", r"\\sqrt{\1}", s)  # \sqrt2 -> \sqrt{2}
    for _ in range(3):  # (5) -> 5, ((C)) -> C; (1,2) and (1)+(2) keep theirs. 3 layers at most: linear time
        b = _bracketed(s)
        if not b or b[0] + b[2] != "()" or len(b[1]) != 1:
            break
        s = s[1:-1]
    return s or None


def to_number(s: str) -> float | None:
    """A finite number from a normalised answer: 12, -0.5, 4.5e33, 4.5\\times10^{33}, \\frac{1}{2}, 3/4."""
    if len(s) > 60:
        return None
    value = None
    if m := re.fullmatch(_NUM, s):
        value = float(s)
    elif m := re.fullmatch(rf"({_NUM})(?:[eE]|\*10\^|\\times10\^|\\cdot10\^)\{{?([+-]?\d+)\}}?", s):
        value = float(f"{m[1]}e{m[2]}")
    elif m := re.fullmatch(r"10\^\{?([+-]?\d+)\}?", s):
        value = float(f"1e{m[1]}")
    elif m := re.fullmatch(rf"([+-]?)\\frac\{{({_NUM})\}}\{{({_NUM})\}}", s) or re.fullmatch(
        rf"()({_NUM})/({_NUM})", s
    ):
        numerator, denominator = float(m[2]), float(m[3])
        value = (-1 if m[1] == "-" else 1) * numerator / denominator if denominator else None
    return value if value is not None and math.isfinite(value) else None


def split_top_level(s: str) -> list[str]:
    """Split on commas outside any brackets: "(1,2),3" -> ["(1,2)", "3"]."""
    parts, depth, start = [], 0, 0
    for i, char in enumerate(s):
        depth += (char in "([{") - (char in ")]}")
        if char == "," and depth == 0:
            parts.append(s[start:i])
            start = i + 1
    return parts + [s[start:]]


def _bracketed(s: str) -> tuple[str, list[str], str] | None:
    """(open, items, close) when the whole string is one bracketed group: (1,2], [3,4), {5,6}."""
    if len(s) < 2 or s[0] not in "([{" or s[-1] not in ")]}":
        return None
    items, depth, start = [], 0, 1
    for i, char in enumerate(s):
        depth += (char in "([{") - (char in ")]}")
        if depth == 0 and i < len(s) - 1:
            return None  # (1)+(2): the first bracket closes early
        if char == "," and depth == 1:
            items.append(s[start:i])
            start = i + 1
    return s[0], items + [s[start:-1]], s[-1]


@dataclass
class _Work:
    """What one answers_match call knows: the work left, the parts of each string, the result of each pair."""

    budget: int = MATCH_BUDGET
    parts: dict = field(default_factory=dict)
    pairs: dict = field(default_factory=dict)


def answers_match(pred: str, gold: str) -> bool:
    """Equality of two normalised answers. Each string is parsed once and each pair compared once per call,
    within MATCH_BUDGET units of work, so deeply nested sets cannot take exponential time; an answer too
    big to compare within the budget is judged wrong."""
    return _match(pred, gold, _Work())


def _match(pred: str, gold: str, work: _Work) -> bool:
    """answers_match inside one call: each pair is compared once, and none once the budget is spent."""
    if (pred, gold) not in work.pairs:
        work.budget -= 20  # a comparison costs about as much as parsing 20 characters
        work.pairs[pred, gold] = work.budget >= 0 and _compare(pred, gold, work)
    return work.pairs[pred, gold]


def _parts(s: str, work: _Work) -> tuple:
    """(number or None, bracketed group or None, top-level items) of s."""
    if s not in work.parts:
        work.budget -= len(s)
        group = _bracketed(s)
        work.parts[s] = (to_number(s), group, [s] if group else split_top_level(s))
    return work.parts[s]


def _compare(pred: str, gold: str, work: _Work) -> bool:
    """Strings, then numbers, then tuples/intervals/sets, then bare lists; the parts go back to _match."""
    if pred == gold:
        return True
    (x, a, items_pred), (y, b, items_gold) = _parts(pred, work), _parts(gold, work)
    if x is not None and y is not None:
        if re.fullmatch(r"[+-]?\d+", pred) and re.fullmatch(r"[+-]?\d+", gold):
            return int(pred) == int(gold)  # integers: exact, whatever their size
        return math.isclose(x, y, rel_tol=1e-4)  # relative only: 0 is not 4.6e-24
    if a and b:  # tuples and intervals: bracket types must match; sets are unordered
        if (a[0], a[2]) != (b[0], b[2]) or len(a[1]) != len(b[1]) or len(a[1]) > 50:
            return False
        if a[0] == "{":
            return _unordered_match(a[1], b[1], work)
        return all(_match(p, g, work) for p, g in zip(a[1], b[1], strict=True))
    if 1 < len(items_gold) == len(items_pred) <= 50:  # bare lists: any order
        return _unordered_match(items_pred, items_gold, work)
    return False


def _unordered_match(preds: list[str], golds: list[str], work: _Work) -> bool:
    """Every pred pairs with its own gold. Identical strings pair first (cheap, and never a wrong choice),
    then each remaining pred takes the first unused gold that matches it."""
    unused, rest = list(golds), []
    for p in preds:
        if p in unused:
            unused.remove(p)
        else:
            rest.append(p)
    for p in rest:
        hit = next((i for i, g in enumerate(unused) if _match(p, g, work)), None)
        if hit is None:
            return False
        del unused[hit]
    return True


def verify(completion: str, gold: str) -> bool:
    """True if the last \\boxed{} of the completion equals the gold answer. Never raises."""
    try:
        boxed = extract_boxed(completion)
        pred = normalize_answer(boxed) if boxed else None
        target = normalize_answer(str(gold))
        return pred is not None and target is not None and answers_match(pred, target)
    except (ValueError, OverflowError, RecursionError):  # a bug must not crash a long run
        return False


# ----------------------------------------------------------------------------------------------
# B. Data and prompt

INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
# The wrapper DAPO-Math-17k puts around every problem on the Hub; we use the paper's instruction.
DAPO_PREFIX = (
    "Solve the following math problem step by step. The last line of your response should be of the "
    "form Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n"
)
DAPO_SUFFIX = '\n\nRemember to put your answer on its own line after "Answer:".'


def toy_problems() -> list[dict]:
    """A dataset for CPU runs that needs no files: a digit written 40 times, and the answer is the digit.
    Two problems, so that a 2-layer model learns them with RL in a minute (with ten it learns nothing)."""
    return [{"problem": d * 40, "answer": d} for d in "01"]


def row_to_example(row: dict, problem_key: str | None = None, answer_key: str | None = None) -> dict | None:
    """One dataset row -> {"problem", "answer"}, or None when it has no usable problem or answer."""
    example = parse_row(row, problem_key, answer_key)
    return example if isinstance(example, dict) else None


def parse_row(row: dict, problem_key: str | None = None, answer_key: str | None = None) -> dict | str:
    """One dataset row -> {"problem", "answer"}, or why it is unusable.

    Recognised: problem/question/prompt (a string or a chat list), answer/final_answer/
    ground_truth, DAPO's reward_model.ground_truth, or the last \\boxed{} of a solution.
    """
    if not isinstance(row, dict):
        return f"a {type(row).__name__}, not an object"
    keys = [problem_key] if problem_key else ["problem", "question", "prompt"]
    problem = next((row[k] for k in keys if k in row), None)
    if isinstance(problem, list):  # chat messages: the last user turn
        turns = [m.get("content") for m in problem if isinstance(m, dict) and m.get("role", "user") == "user"]
        problem = turns[-1] if turns else None
    if answer_key:
        answer = row.get(answer_key)
    elif isinstance(row.get("reward_model"), dict):  # DAPO
        answer = row["reward_model"].get("ground_truth")
    elif any(k in row for k in ("answer", "final_answer", "ground_truth")):
        answer = next((row[k] for k in ("answer", "final_answer", "ground_truth") if row.get(k) is not None), None)
    else:  # a worked solution (MATH) or a bare gold (open-r1's DAPO copy)
        answer = row.get("solution")
        if isinstance(answer, str) and "\\boxed" in answer:
            answer = extract_boxed(answer)
    if isinstance(answer, list) and len(answer) == 1:  # OlympiadBench: a list of one
        answer = answer[0]
    if isinstance(answer, float) and answer.is_integer():
        answer = int(answer)  # 27.0 -> "27"
    if not isinstance(problem, str) or not problem.strip():
        return "no problem text (or a chat without a user turn)"
    if isinstance(answer, bool) or not isinstance(answer, (str, int, float)) or not str(answer).strip():
        return f"the gold answer is {'empty' if answer in (None, '') else 'a ' + type(answer).__name__}"
    problem = problem.strip().removeprefix(DAPO_PREFIX.strip()).removesuffix(DAPO_SUFFIX.strip()).strip()
    return {"problem": problem, "answer": str(answer).strip()}


def read_rows(path: Path) -> list[dict]:
    """Rows of a local .jsonl, .json (a list of objects) or .parquet file; errors name the file and line."""
    if not path.is_file():
        sys.exit(f"--dataset {path}: no such file")
    if path.suffix == ".parquet":
        import datasets  # imported here: the other paths and most tests do not need it

        try:
            rows = list(datasets.load_dataset("parquet", data_files=str(path), split="train"))
        except Exception as e:  # pyarrow's many error types; the message below is what a user needs
            sys.exit(f"--dataset {path}: not a readable parquet file ({type(e).__name__})")
    elif path.suffix == ".jsonl":
        rows = [row for _, row in jsonl_objects(path)[0]]
    else:
        try:
            rows = json.loads(path.read_text(encoding="utf-8") or "[]")
        except UnicodeDecodeError as e:
            sys.exit(f"--dataset {path}: not UTF-8 (byte {e.start})")
        except json.JSONDecodeError as e:
            sys.exit(f"--dataset {path}: line {e.lineno}: not JSON ({e.msg})")
        if not isinstance(rows, list):
            sys.exit(f"--dataset {path}: a .json dataset must be a list of objects (use .jsonl for one per line)")
    if not rows:
        sys.exit(f"--dataset {path}: the file is empty")
    return rows


def load_problems(cfg: Config, tokenizer=None) -> list[dict]:
    """Problems with gold answers from 'toy', a local file or the Hub, deduplicated by text; with a
    tokenizer, only those whose prompt fits --max-prompt-tokens, with their token ids."""
    if cfg.dataset == "toy":
        examples = toy_problems()
    else:
        path = Path(cfg.dataset)
        if path.suffix in (".jsonl", ".json", ".parquet"):
            rows = read_rows(path)
        elif path.exists():
            sys.exit(f"--dataset {path}: local files are read as .jsonl, .json (a list of objects) or .parquet")
        else:
            import datasets

            rows = from_hub(lambda: datasets.load_dataset(cfg.dataset, cfg.dataset_config, split=cfg.split),
                            f"--dataset {cfg.dataset}", "--dataset path/to/file.jsonl or --dataset toy")  # fmt: skip
        examples = usable_examples(rows, cfg)
    if tokenizer is None:
        return examples
    problems = [{**e, "prompt_ids": encode_prompt(e["problem"], tokenizer, cfg.prompt_format)} for e in examples]
    fitting = [p for p in problems if len(p["prompt_ids"]) <= cfg.max_prompt_tokens]
    print(f"data: {len(fitting)} problems with prompts of at most {cfg.max_prompt_tokens} tokens")
    if not fitting:
        shortest = min(len(p["prompt_ids"]) for p in problems)
        sys.exit(f"--max-prompt-tokens {cfg.max_prompt_tokens}: no prompt fits (the shortest has {shortest} tokens)")
    return fitting


def usable_examples(rows, cfg: Config) -> list[dict]:
    """Examples of the usable rows, unique by problem; the rows skipped are counted, with the first reason."""
    columns = set().union(*(r.keys() for r in rows[:100] if isinstance(r, dict))) if len(rows) else set()
    for key, flag in ((cfg.problem_key, "--problem-key"), (cfg.answer_key, "--answer-key")):
        if key and key not in columns:
            sys.exit(f"{flag} {key!r} is not a column of {cfg.dataset}; columns: {sorted(columns)}")
    has_problem = cfg.problem_key or {"problem", "question", "prompt"} & columns
    has_answer = cfg.answer_key or {"answer", "final_answer", "ground_truth", "reward_model", "solution"} & columns
    if not (has_problem and has_answer):
        sys.exit(f"{cfg.dataset}: no problem/answer columns recognised among {sorted(columns)}; "
                 "name them with --problem-key and --answer-key")  # fmt: skip
    examples, seen, skipped = [], set(), []
    for number, row in enumerate(rows, 1):
        example = parse_row(row, cfg.problem_key, cfg.answer_key)
        if isinstance(example, str):
            skipped.append(f"row {number}: {example}")
        elif example["problem"] not in seen:  # the Hub DAPO-Math-17k repeats each problem ~100x
            seen.add(example["problem"])
            examples.append(example)
    first = f"; first: {skipped[0]}" if skipped else ""
    print(f"data: {len(examples)} problems from {cfg.dataset} ({len(skipped)} unusable rows skipped{first})")
    if not examples:
        sys.exit(f"--dataset {cfg.dataset}: no usable rows{first}")
    return examples


def build_prompt(problem: str, tokenizer, prompt_format: str = "chat") -> str:
    """The problem plus the paper's instruction, in the tokenizer's chat template or as plain text."""
    content = f"{problem}\n\n{INSTRUCTION}"
    if prompt_format == "plain":
        return content + "\n\n"
    messages = [{"role": "user", "content": content}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def encode_prompt(problem: str, tokenizer, prompt_format: str = "chat") -> torch.Tensor:
    """Token ids of build_prompt's text; the template already holds any special tokens."""
    return torch.tensor(
        tokenizer(build_prompt(problem, tokenizer, prompt_format), add_special_tokens=False)["input_ids"]
    )


def prompts_for_step(problems: list, step: int, n: int, seed: int) -> list:
    """The n problems of a step: a fresh seeded permutation each epoch, so a resumed run continues
    exactly where it stopped from the step number alone."""
    picked, orders = [], {}
    for pos in range(step * n, (step + 1) * n):
        epoch, i = divmod(pos, len(problems))
        if epoch not in orders:
            orders[epoch] = torch.randperm(
                len(problems), generator=torch.Generator().manual_seed(seed * 100_003 + epoch)
            )
        picked.append(problems[orders[epoch][i]])
    return picked


# ----------------------------------------------------------------------------------------------
# C. Models and devices: a Hub/local checkpoint, or a tiny random Qwen3 with a byte-level tokenizer for CPU.


def build_tiny_tokenizer():
    """Byte-level tokenizer (256 bytes + Qwen's three special tokens): any text, no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    tokenizer.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    return tokenizer


def tiny_config():
    """A 2-layer Qwen3 config shaped like the real one (GQA, tied embeddings), for the tiny tokenizer:
    256 bytes, then <|endoftext|> (256, also pad), <|im_start|>, <|im_end|> (258)."""
    from transformers import Qwen3Config

    return Qwen3Config(
        vocab_size=259, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=2048, tie_word_embeddings=True,
        eos_token_id=[256, 258], pad_token_id=256, bos_token_id=None,
    )  # fmt: skip


def build_tiny_model(tokenizer, seed: int = 0):
    """A tiny Qwen3 with random weights."""
    from transformers import Qwen3ForCausalLM

    torch.manual_seed(seed)
    config = tiny_config()
    assert config.vocab_size == len(tokenizer) and config.pad_token_id == tokenizer.pad_token_id
    return Qwen3ForCausalLM(config)


def teach_format(model, tokenizer, steps: int = 300):
    """--model tiny-sft: supervised steps on the toy prompts with the answer \\boxed{d}, d a random digit, so
    that RL starts near reward 0.1 as a base model does on math, instead of at 0 (a random model never
    writes \\boxed{}). About 15 s on a CPU."""
    end = [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    prompts = [encode_prompt(e["problem"], tokenizer) for e in toy_problems()]
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in tqdm(range(steps), desc="tiny-sft: teaching the answer format", leave=False, disable=None):
        answers = [
            tokenizer(f"\\boxed{{{random.randint(0, 9)}}}", add_special_tokens=False)["input_ids"] + end
            for _ in range(16)
        ]
        seqs = [torch.cat([p, torch.tensor(a)]) for p, a in zip(random.choices(prompts, k=16), answers, strict=True)]
        ids = torch.nn.utils.rnn.pad_sequence(seqs, batch_first=True, padding_value=tokenizer.pad_token_id)
        labels = torch.full_like(ids, -100)  # the loss on the answers only
        for row, (seq, answer) in enumerate(zip(seqs, answers, strict=True)):
            labels[row, len(seq) - len(answer) : len(seq)] = seq[-len(answer) :]
        model(input_ids=ids, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return model


def load_model_config(name: str):
    """The model's config alone (config.json of a folder or a Hub id): enough for the memory plan."""
    from transformers import AutoConfig

    if name in TINY:
        return tiny_config()
    return from_hub(lambda: AutoConfig.from_pretrained(name), f"--model {name}", "--model path/to/folder")


def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    if name in TINY:
        return build_tiny_tokenizer()
    tokenizer = from_hub(lambda: AutoTokenizer.from_pretrained(name), f"--model {name}", "--model path/to/folder")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(name: str, device: torch.device, tokenizer, seed: int = 0, dtype=torch.float32):
    """The policy, in fp32 to train: at lr 1e-6, bf16 master weights would drop the update (eval: bf16)."""
    from transformers import AutoModelForCausalLM

    if name in TINY:
        model = build_tiny_model(tokenizer, seed)
        return (teach_format(model, tokenizer) if name == "tiny-sft" else model).to(device, dtype)
    load = lambda: AutoModelForCausalLM.from_pretrained(name, dtype=dtype, use_safetensors=True)  # noqa: E731 -- one call, named for from_hub
    return from_hub(load, f"--model {name}", "--model path/to/folder").to(device)


def load_policy(name: str, device: torch.device, seed: int = 0, dtype=torch.float32):
    """(model, tokenizer); the model in fp32 unless dtype says otherwise."""
    tokenizer = load_tokenizer(name)
    return load_model(name, device, tokenizer, seed, dtype), tokenizer


def bf16_copy(model):
    """A bf16 copy of the policy for sampling, made from the fp32 master weights (so it follows every
    optimizer step); tied weights stay one tensor, buffers (rotary frequencies) are shared in fp32."""
    with torch.device("meta"):
        copy = type(model)(model.config)
    state = model.state_dict()
    cast = {t.data_ptr(): t.to(torch.bfloat16) for t in {t.data_ptr(): t for t in state.values()}.values()}
    copy.load_state_dict({name: cast[t.data_ptr()] for name, t in state.items()}, assign=True)
    for name, buffer in model.named_buffers():
        module, _, attr = name.rpartition(".")
        setattr(copy.get_submodule(module), attr, buffer)
    copy.generation_config = model.generation_config
    return copy.eval()


def from_hub(load, what: str, local: str):
    """load(), with one line instead of a traceback when the Hub cannot be reached or a local
    folder is damaged."""
    name = what.split(" ", 1)[1]
    if not Path(name).exists() and (name.startswith(("/", ".", "~")) or name.count("/") > 1):
        sys.exit(f"{what}: no such folder (a path, not a Hub id like Qwen/Qwen3-1.7B-Base)")
    if (Path(name) / "trainer_state.pt").exists():
        what = f"--resume {name}"
    if Path(name).is_dir() and not (Path(name) / "config.json").exists():
        latest = max(checkpoints(Path(name)), key=checkpoint_step, default=None)
        run = f" (a run folder: pass one of its checkpoints, e.g. {latest})" if latest else ""
        sys.exit(f"{what}: no config.json in it, so not a model folder{run}")
    try:
        return load()
    except Exception as e:  # a local folder: whatever its damage (safetensors, json, ...), one line
        if not Path(name).exists() and not isinstance(e, (OSError, ValueError, ConnectionError)):
            raise  # not a loading failure: a bug, show it whole
        if Path(name).exists():
            sys.exit(f"{what}: cannot be loaded from it ({type(e).__name__}: {str(e).splitlines()[0][:200]})")
        sys.exit(f"{what}: could not load it from the Hugging Face Hub ({type(e).__name__}). Offline? Download it "
                 f"where the Hub is reachable and pass the folder: {local}. Without any download: "
                 "python stapo.py --model tiny --dataset toy")  # fmt: skip


def quiet_libraries():
    """No progress bars for saving and loading a checkpoint (ours show the rollouts), and each Hub warning
    once: an offline Hub otherwise repeats two lines per retry before the one line that says what to do."""
    import logging

    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    seen = set()

    def first_time(record) -> bool:
        text = re.sub(r"\d+", "N", record.getMessage())  # "Retrying in 2s [Retry 2/5]" as "Retrying in Ns ..."
        return text not in seen and not seen.add(text)

    logging.getLogger("huggingface_hub.utils._http").addFilter(first_time)


def eos_token_ids(model, tokenizer) -> list[int]:
    """Every id that ends an answer: Qwen3-Base stops on <|endoftext|>, chat turns end on <|im_end|>."""
    ids = {tokenizer.eos_token_id}
    configured = model.generation_config.eos_token_id
    ids |= set(configured if isinstance(configured, list) else [configured])
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if isinstance(im_end, int) and im_end != tokenizer.unk_token_id:
        ids.add(im_end)
    return sorted(i for i in ids if i is not None)


def resolve_device(cfg: Config) -> torch.device:
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.device)


def device_memory(cfg: Config, device: torch.device) -> float:
    """Bytes the run may plan for: --gpu-memory-gb, else what is free on the GPU (the CUDA context, other
    processes and NCCL's buffers are not) plus what this process's allocator already holds, else the RAM."""
    if cfg.gpu_memory_gb > 0:
        return cfg.gpu_memory_gb * 1e9
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_reserved(device)
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def uses_bf16(cfg: Config, device: torch.device) -> bool:
    return cfg.precision == "bf16-autocast" or (cfg.precision == "auto" and device.type == "cuda")


def autocast(cfg: Config, device: torch.device):
    """bf16 autocast over fp32 weights on CUDA (or when asked for); plain fp32 otherwise."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if uses_bf16(cfg, device) else nullcontext()


def left_pad(seqs: list[torch.Tensor], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention_mask), both (b, max_len), padded on the left as generate expects."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, s in enumerate(seqs):
        ids[row, width - len(s) :] = s
        mask[row, width - len(s) :] = 1
    return ids, mask


def sequences_per_generate(model, prompt_len: int, cfg: Config, kv_cache_bytes: float) -> int:
    """How many sequences one generate call may hold so their KV cache fits kv_cache_bytes."""
    per_token = kv_bytes_per_token(model.config, uses_bf16(cfg, next(model.parameters()).device))
    return max(1, int(kv_cache_bytes // (per_token * (prompt_len + cfg.max_new_tokens))))


# ----------------------------------------------------------------------------------------------
# D. Checkpoints and log files


LOG_FILES = ("metrics.jsonl", "samples.jsonl", "spurious.jsonl")


def check_run_folder(cfg: Config) -> bool:
    """One run, one folder. A fresh run needs a folder without a run in it. --resume continues in the
    checkpoint's own folder only from its latest checkpoint; from an earlier one it must branch into
    a new --output-dir. Returns whether this run continues in the checkpoint's folder."""
    out = Path(cfg.output_dir)
    ckpt = Path(cfg.resume) if cfg.resume else None
    if ckpt is not None and out.resolve() == ckpt.parent.resolve():
        latest = max(checkpoints(out), key=checkpoint_step)
        if latest.resolve() != ckpt.resolve():
            sys.exit(f"--resume {ckpt}: {out} has a later checkpoint, {latest.name}; continuing here would mix "
                     f"two histories. Branch into a new folder: --output-dir NEW_FOLDER")  # fmt: skip
        return True
    if checkpoints(out):
        sys.exit(f"--output-dir {out} already holds a run; continue it with --resume "
                 f"{max(checkpoints(out), key=checkpoint_step)}, "
                 "or give a new --output-dir")  # fmt: skip
    if out.exists() and any((out / n).exists() for n in (*LOG_FILES, "stapo_config.json")):
        sys.exit(f"--output-dir {out} holds the records of a run that stopped before its first checkpoint; "
                 "there is nothing to resume: move the folder away or give a new --output-dir")  # fmt: skip
    return False


def open_run_folder(cfg: Config, same_run: bool) -> Path:
    """The run folder with stapo_config.json (what actually runs). Nothing is ever deleted: in the same
    run, records of steps after the checkpoint (the stop lost them) are set aside in
    <name>.after-step-N.jsonl; a branch starts with its parent's records up to the checkpoint."""
    out, ckpt = Path(cfg.output_dir), Path(cfg.resume) if cfg.resume else None
    for name in LOG_FILES if same_run else ():
        set_aside_records_after(out / name, checkpoint_step(ckpt))
    out.mkdir(parents=True, exist_ok=True)
    config = dataclasses.asdict(cfg)
    if ckpt is not None and not same_run:  # a branch: where it came from, and its history up to there
        config["branched_from"] = str(ckpt.resolve())
        for name in LOG_FILES:
            source = ckpt.parent / name
            records = [r for r in read_jsonl(source) if r["step"] <= checkpoint_step(ckpt)] if source.exists() else []
            write_jsonl(out / name, records)
    replace_file(out / "stapo_config.json", json.dumps(config, indent=2))
    print(f"config: {out / 'stapo_config.json'}")
    return out


def checkpoints(run: Path) -> list[Path]:
    return [p for p in run.glob("step-*") if (p / "trainer_state.pt").exists()]


def checkpoint_step(ckpt: Path) -> int:
    match = re.fullmatch(r"step-(\d+)", Path(ckpt).name)
    return int(match[1]) if match else -1


def restore_trainer_state(cfg: Config, model, optimizer, scheduler) -> int:
    """Optimizer, schedule and RNG of the checkpoint; then the flags of this run on top (--lr, --weight-decay,
    --warmup-steps). Returns the step to continue from."""
    path = Path(cfg.resume) / "trainer_state.pt"
    try:
        state = torch.load(path, weights_only=True)  # tensors and numbers only: nothing is executed
        if dist.is_initialized():
            load_sharded_optimizer(model, optimizer, path.parent)
        else:
            optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
    except Exception as e:  # a damaged file: torch's own message would suggest weights_only=False, never do that
        sys.exit(f"{path}: not a readable trainer state ({type(e).__name__}); resume from an earlier checkpoint")
    rng = state["rng"][rank_and_world()[0]] if isinstance(state["rng"], list) else state["rng"]  # one per rank
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    scheduler.base_lrs = [cfg.lr for _ in optimizer.param_groups]
    for group in optimizer.param_groups:
        group.update(initial_lr=cfg.lr, lr=cfg.lr * scheduler.lr_lambdas[0](scheduler.last_epoch),
                     weight_decay=cfg.weight_decay)  # fmt: skip
    print(f"resumed from {cfg.resume} at step {state['step']}")
    return state["step"]


def save_checkpoint(model, tokenizer, optimizer, scheduler, cfg: Config, step: int) -> Path:
    """Write out/step-N atomically: a temporary folder, then one rename. A failed write (a full disk)
    removes the temporary folder and stops with one line naming the last good checkpoint. Under
    torchrun every rank calls it; rank 0 writes, and the optimizer state is saved sharded."""
    out, (rank, world) = Path(cfg.output_dir), rank_and_world()
    final, tmp = out / f"step-{step:06d}", out / f".tmp-step-{step:06d}"
    rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    try:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        barrier()
        weights, rngs = sharded_state(model, optimizer, tmp), all_records([rng])
        if rank == 0:
            model.save_pretrained(tmp, state_dict=weights)  # safetensors; weights None: the model's own
            tokenizer.save_pretrained(tmp)
            state = {"step": step, "scheduler": scheduler.state_dict(), "rng": rngs if world > 1 else rng}
            if world == 1:
                state["optimizer"] = optimizer.state_dict()
            torch.save(state, tmp / "trainer_state.pt")
            replace_file(
                tmp / "stapo_config.json", json.dumps({**dataclasses.asdict(cfg), "world_size": world}, indent=2)
            )
            os.replace(tmp, final)
    except (OSError, RuntimeError) as e:  # torch reports a full disk as a RuntimeError
        shutil.rmtree(tmp, ignore_errors=True)
        why = "the disk is full" if "No space left" in str(e) or getattr(e, "errno", None) == 28 else "the write failed"
        last = max(checkpoints(out), key=checkpoint_step, default=None)
        sys.exit(f"could not save {final}: {why} ({type(e).__name__}: {str(e).splitlines()[0][:120]}); "
                 f"the last good checkpoint is {last or 'none yet'}")  # fmt: skip
    barrier()
    return final


class DecodeProgress:
    """Progress of the rollouts, as a generate() streamer that counts decoding steps: a tqdm bar in a
    terminal, and a line every `every` seconds when output goes to a file (a cluster job's log)."""

    def __init__(self, desc: str, calls: int, max_new_tokens: int, every: float = 30.0):
        self.desc, self.total, self.per_call, self.every = desc, calls * max_new_tokens, max_new_tokens, every
        self.bar = tqdm(total=self.total, desc=desc, unit="tok", leave=False, disable=None)
        self.steps, self.calls_done, self.start, self.last_line = 0, 0, time.time(), time.time()

    def put(self, ids):  # generate() calls it with the prompt, then once per decoding step
        self.steps += 1
        self.bar.update(1)
        if self.bar.disable and time.time() - self.last_line >= self.every:  # other ranks print to /dev/null
            self.last_line = time.time()
            print(f"{self.desc}: {self.steps}/{self.total} decoding steps, {time.time() - self.start:.0f}s", flush=True)

    def end(self):  # a call ends, early when every answer has stopped: count it whole
        self.calls_done += 1
        self.bar.update(self.calls_done * self.per_call - self.steps)
        self.steps = self.calls_done * self.per_call

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.bar.close()


def log_line(m: dict) -> str:
    tau_h = f"{m['tau_h']:.3f}" if m["tau_h"] is not None else "  -  "
    return (
        f"step {m['step']:>4}/{m['steps']} | reward {m['reward']:.3f} | zero-std {m['frac_zero_std']:.2f} | "
        f"len {m['len_mean']:6.1f} | trunc {m['truncated_frac']:.2f} | H {m['entropy']:.3f} | "
        f"silenced {m['n_spurious']:>3}/{m['n_candidates']:<4} ({100 * m['spurious_frac']:.4f}%) tau_h {tau_h} | "
        f"clip {100 * m['clip_frac']:.2f}% | loss {m['loss']:+.4f} | gnorm {m['grad_norm']:.3f} | "
        f"lr {m['lr']:.1e} | gen {m['gen_s']:.1f}s train {m['train_s']:.1f}s"
    )


def jsonl_objects(path: Path, torn_tail_ok: bool = False) -> tuple[list[tuple[int, dict]], int]:
    """(line number, object) of each non-blank line and the byte length of the lines kept. Anything but one
    JSON object per UTF-8 line is a one-line SystemExit naming file and line; with torn_tail_ok, a last line
    that a kill during an append cut short (no newline, does not parse) is dropped with a warning instead."""
    data = path.read_bytes()
    lines = data.split(b"\n")  # the last item is b"" when the file ends with a newline
    objects = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError as e:
            problem = f"not UTF-8 (byte {line[e.start]:#x} at column {e.start + 1})"
        except json.JSONDecodeError as e:
            problem = f"not JSON ({e.msg} at column {e.colno})"
        else:
            if isinstance(obj, dict):
                objects.append((n, obj))
                continue
            problem = f"a JSON {type(obj).__name__}, not an object"
        if torn_tail_ok and n == len(lines):
            print(f"warning: {path}: line {n} is cut short (a crash while writing?); dropped", file=sys.stderr)
            return objects, len(data) - len(line)
        sys.exit(f"{path}: line {n}: {problem}")
    return objects, len(data)


def read_jsonl(path: Path) -> list[dict]:
    """Records of a log file; a torn last line is dropped with a warning."""
    return [record for _, record in jsonl_objects(path, torn_tail_ok=True)[0]]


def set_aside_records_after(path: Path, step: int):
    """Keep the records up to `step` in path; move later ones (and a torn last line) out of the way."""
    if not path.exists():
        return
    records = read_jsonl(path)
    kept = [r for r in records if r["step"] <= step]
    torn = not path.read_bytes().endswith(b"\n") and path.stat().st_size > 0  # every append ends with a newline
    if len(kept) == len(records) and not torn:
        return
    append_jsonl(path.with_name(f"{path.stem}.after-step-{step:06d}.jsonl"), records[len(kept) :])
    write_jsonl(path, kept)


def write_jsonl(path: Path, records: list[dict]):
    replace_file(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def replace_file(path: Path, data: str | bytes):
    """Replace a file whole or not at all: a temporary file beside it, flushed to disk, then renamed
    (a kill leaves the old file or the new one, never half of one)."""
    tmp = path.with_name(f".{path.name}.tmp")  # the same folder, so os.replace is a rename
    try:
        with tmp.open("wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def append_jsonl(path: Path, records: list[dict]):
    """Log files only ever grow during a run."""
    with path.open("a", encoding="utf-8") as f:
        f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        f.flush()
        os.fsync(f.fileno())


def inspect_token(s: dict, rollouts: Rollouts, tokenizer, step: int, context: int = 8) -> dict:
    """A silenced token with a few decoded tokens of context on each side."""
    ids = rollouts.completions[s["row"], rollouts.completion_mask[s["row"]]].tolist()
    t = s["t"]
    return {
        "step": step, "token": tokenizer.decode(ids[t : t + 1]),
        "left": tokenizer.decode(ids[max(0, t - context) : t]), "right": tokenizer.decode(ids[t + 1 : t + 1 + context]),
        "p": s["p"], "H": s["H"], "A": s["A"], "tau_h": s["tau_h"], "sample": s["row"], "position": t,
    }  # fmt: skip


# ----------------------------------------------------------------------------------------------
# E. Memory plan: the bytes of each part and the peak of each phase, from a model config alone.
# GB here is 1e9 bytes; D hidden size, M MLP width, H and K query and key/value heads of width d.

HEADROOM = 0.9  # plan to 90 % of the device: the CUDA allocator rounds and fragments


def layer_parameters(c) -> int:
    D, M, H, K, d = c.hidden_size, c.intermediate_size, c.num_attention_heads, c.num_key_value_heads, head_dim(c)
    return D * H * d + 2 * D * K * d + H * d * D + 3 * D * M + 2 * D + 2 * d  # attention, MLP, norms


def parameter_count(c) -> int:
    """Parameters of a Qwen3/Llama-style decoder from its config."""
    embeddings = c.vocab_size * c.hidden_size * (1 if getattr(c, "tie_word_embeddings", False) else 2)
    return c.num_hidden_layers * layer_parameters(c) + embeddings + c.hidden_size


def head_dim(c) -> int:
    return getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads


def kv_bytes_per_token(c, bf16: bool) -> int:
    """KV-cache bytes per token of a sequence: K and V of every layer."""
    return 2 * c.num_hidden_layers * c.num_key_value_heads * head_dim(c) * (2 if bf16 else 4)


def activation_bytes_per_token(c) -> int:
    """Bytes autograd keeps per token per decoder layer: fp32 weights under bf16 autocast, no
    checkpointing. Measured on CPU at the real widths of Qwen3-1.7B and 8B with saved-tensor hooks
    (test_plan_matches_saved_tensors_at_real_width), term by term:
      26 D: the fp32 layer input, normed input and mid-layer sum of both RMSNorms (4 x 4 D), and
            autocast's bf16 casts of the normed input, once per q/k/v and gate/up projection (5 x 2 D);
      8 M:  the MLP's gate, SiLU, up and product outputs, bf16;
      10 H d + 10 K d: q/k norms (fp32 input, bf16 output), SDPA's q, k, v and output (bf16);
      8 H + 4 K + 8: RMSNorm reciprocals and SDPA's fp32 logsumexp.
    On CUDA, flash and cuDNN attention save the same tensors and the fp32 autocast ops of CUDA act on
    tensors that are fp32 here already, so the figure holds; a fallback to the math SDPA kernel
    (GPUs older than sm80) would keep the (T, T) attention matrix: far more. The CUDA allocator adds
    a few to 20 %, which HEADROOM covers.
    """
    D, M, H, K, d = c.hidden_size, c.intermediate_size, c.num_attention_heads, c.num_key_value_heads, head_dim(c)
    return 26 * D + 8 * M + 10 * H * d + 10 * K * d + 8 * H + 4 * K + 8


PHASES = {  # the parts alive at the peak of each phase of a step
    "generation": ("weights", "adamw", "rollout_weights", "gathered_model", "kv_cache", "sampling"),
    "scoring": ("weights", "adamw", "autocast_weights", "gathered_layers", "forward_working", "lm_head_chunk"),
    "update": ("weights", "gradients", "adamw", "autocast_weights", "gathered_layers", "activations", "lm_head_chunk"),
    "optimizer step": ("weights", "gradients", "adamw", "optimizer_temporaries"),
}


def plan_memory(model_config, cfg: Config, world_size: int = 1, device_bytes: float | None = None,
                device_type: str = "cuda") -> dict:  # fmt: skip
    """Bytes of each part and the peak of each phase (PHASES) on one rank, as a flat dict of numbers.

    Resolves the automatic settings against the device's memory (default: --gpu-memory-gb, else
    80 GB): gradient checkpointing (on when the update would not fit without it) and the KV-cache
    budget (what generation leaves free, in as few generate calls as fit).
    """
    c, W = model_config, world_size
    if getattr(c, "num_experts", None) or getattr(c, "num_local_experts", None):
        raise SystemExit(
            f"{cfg.model}: a mixture of experts ({c.model_type}); the memory plan covers dense decoders only"
        )
    device_bytes = device_bytes or (cfg.gpu_memory_gb or 80) * 1e9
    D, M, L, V = c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.vocab_size
    n = parameter_count(c)
    bf16 = cfg.precision == "bf16-autocast" or (cfg.precision == "auto" and device_type == "cuda")
    seq = cfg.max_prompt_tokens + cfg.max_new_tokens  # a full-length sequence
    tokens = max(1, cfg.micro_batch_tokens // seq) * seq  # a full micro-batch (one sequence at least)
    per_layer = activation_bytes_per_token(c)
    padded = per_layer + 4 * (c.num_attention_heads - c.num_key_value_heads) * head_dim(c) + 2 * seq  # K/V repeat, mask
    plan = {
        "parameters": n, "world_size": W, "device_bytes": device_bytes, "budget": HEADROOM * device_bytes,
        "micro_batch_tokens_planned": tokens, "activations_per_token_per_layer": per_layer,
        "weights": 4 * n / W, "gradients": 4 * n / W, "adamw": 8 * n / W, "optimizer_temporaries": 4 * n / W,
        "autocast_weights": 2 * n if bf16 and W == 1 else 0,  # bf16 copies of every layer, kept for backward
        "rollout_weights": 2 * n if bf16 and W == 1 else 0,  # generate's bf16 copy of the policy
        # FSDP2 gathers weights in bf16 (fp32 without autocast): the whole model for the rollouts, and
        # otherwise the root group (embeddings, head) and about two layers at a time
        "gathered_model": (2 if bf16 else 4) * n if W > 1 else 0,
        "gathered_layers": (2 if bf16 else 4) * (n - L * layer_parameters(c) + 2 * layer_parameters(c)) if W > 1 else 0,
        "activations_full": tokens * (L * padded + 12 * D),  # + final norm and the LM head's input
        # checkpointing keeps each layer's fp32 input, and recomputes one layer in backward (1.12x, measured)
        "activations_checkpointed": tokens * (L * 4 * D + 1.12 * padded + 12 * D),
        "lm_head_chunk": 4 * 4 * min(cfg.logit_chunk or tokens, tokens) * V,  # fp32 logits, log-probs, 2 grads
        "forward_working": tokens * (6 * M + 14 * D),  # one layer's transients without grad, and the hidden states
    }  # fmt: skip
    without = sum(plan[k] for k in PHASES["update"] if k != "activations") + plan["activations_full"]
    checkpointing = cfg.gradient_checkpointing == "on" or (
        cfg.gradient_checkpointing == "auto" and without > plan["budget"]
    )
    plan["gradient_checkpointing"] = int(checkpointing)
    plan["activations"] = plan["activations_checkpointed" if checkpointing else "activations_full"]

    # Generation: per sequence of a generate call, its KV cache, the sampler's fp32 logits,
    # probabilities and top-p sort, and the prefill's transients. Gradients are freed by then.
    kv_per_seq = seq * kv_bytes_per_token(c, bf16)
    sampling_per_seq = 20 * V + cfg.max_prompt_tokens * (6 * M + 14 * D)
    resident = plan["weights"] + plan["adamw"] + plan["rollout_weights"] + plan["gathered_model"]
    rollouts = cfg.prompts_per_step * cfg.group_size // W
    if cfg.kv_cache_gb > 0:  # given: it wins
        per_call = max(1, int(cfg.kv_cache_gb * 1e9 // kv_per_seq))
    else:  # what the budget leaves free
        per_call = max(1, int((plan["budget"] - resident) // (kv_per_seq + sampling_per_seq)))
    calls = math.ceil(rollouts / per_call)
    per_call = min(per_call, math.ceil(rollouts / calls))  # as few calls as fit, evenly filled
    plan.update(sequences_per_generate=per_call, generate_calls=calls, kv_cache=per_call * kv_per_seq,
                sampling=per_call * sampling_per_seq)  # fmt: skip
    for phase, parts in PHASES.items():
        plan[f"peak_{phase.replace(' ', '_')}"] = sum(plan[k] for k in parts)
    plan["peak"] = max(plan[f"peak_{phase.replace(' ', '_')}"] for phase in PHASES)
    return plan


PART_LABELS = {
    "weights": "fp32 weights", "gradients": "fp32 gradients", "adamw": "AdamW states (2 x fp32)",
    "optimizer_temporaries": "AdamW step temporaries", "autocast_weights": "bf16 weight copies (autocast)",
    "rollout_weights": "bf16 copy of the policy (rollouts)",
    "gathered_model": "whole weights for rollouts (FSDP)", "gathered_layers": "gathered root + layers (FSDP)",
    "kv_cache": "KV cache of one generate call", "sampling": "sampler logits + prefill",
    "forward_working": "forward without grad", "activations": "activations of a micro-batch",
    "lm_head_chunk": "LM-head chunk (--logit-chunk)",
}  # fmt: skip


def format_plan(plan: dict, model_config, cfg: Config) -> str:
    """The plan as a table: one row per part, one column per phase, in GB."""
    c, gb = model_config, 1e9
    head = f"{'part (GB)':<34}" + "".join(f"{phase:>16}" for phase in PHASES)
    lines = [
        f"memory plan: {cfg.model} ({plan['parameters'] / 1e9:.2f} B parameters, {c.num_hidden_layers} layers, "
        f"hidden {c.hidden_size}), {plan['world_size']} GPU(s) of {plan['device_bytes'] / gb:.0f} GB each, "
        f"planned to {HEADROOM:.0%} = {plan['budget'] / gb:.1f} GB",
        head, "-" * len(head),
    ]  # fmt: skip
    for key, label in ((k, v) for k, v in PART_LABELS.items() if plan[k]):  # parts this setting has
        cells = [f"{plan[key] / gb:16.1f}" if key in parts else f"{'-':>16}" for parts in PHASES.values()]
        lines.append(f"{label:<34}" + "".join(cells))
    lines.append(f"{'peak':<34}" + "".join(f"{plan['peak_' + p.replace(' ', '_')] / gb:16.1f}" for p in PHASES))
    lines.append(plan_summary(plan))
    return "\n".join(lines)


def plan_summary(plan: dict) -> str:
    """The plan in one line, printed at the start of every run."""
    fits = "fits" if plan["peak"] <= plan["budget"] else "DOES NOT FIT"
    return (
        f"plan: peak {plan['peak'] / 1e9:.1f} GB of {plan['budget'] / 1e9:.1f} GB ({fits}) | "
        f"gradient checkpointing {'on' if plan['gradient_checkpointing'] else 'off'} | "
        f"micro-batch {plan['micro_batch_tokens_planned']:,} tokens, activations {plan['activations'] / 1e9:.1f} GB | "
        f"{plan['generate_calls']} generate call(s) per step of {plan['sequences_per_generate']} sequences, "
        f"KV cache {plan['kv_cache'] / 1e9:.1f} GB"
    )


def fixes_that_fit(model_config, cfg: Config, world_size: int, device_bytes: float, device_type: str) -> str:
    """What brings the planned peak within the budget: the fewest GPUs (none added on a CPU), then the fewest
    kinds of change (checkpointing, a smaller micro-batch, an automatic KV budget, shorter answers), each
    combination with its peak; or why nothing does."""
    seq = cfg.max_prompt_tokens + cfg.max_new_tokens
    kinds = [  # each kind's options, mildest first
        [{"gradient_checkpointing": "on"}] if cfg.gradient_checkpointing != "on" else [],
        [{"micro_batch_tokens": n * seq} for n in range(cfg.micro_batch_tokens // seq - 1, 0, -1)],
        [{"kv_cache_gb": 0}] if cfg.kv_cache_gb > 0 else [],
        [{"max_new_tokens": cfg.max_new_tokens // 2**k} for k in (1, 2, 3)],
    ]
    kinds = [k for k in kinds if k]
    more_gpus = [n for n in (2, 4, 8, 16, 32, 64) if n > world_size] if device_type == "cuda" else []

    def describe(change: dict, gpus: int, plan: dict) -> str:
        flags = [f"--{k.replace('_', '-')} {v}" for k, v in change.items()] + [f"{gpus} GPUs"] * (gpus > world_size)
        slow = plan["generate_calls"] >= 8  # each call decodes to its longest answer: many small calls are slow
        note = f", {plan['generate_calls']} generate calls of {plan['sequences_per_generate']}: slow" if slow else ""
        return f"{' + '.join(flags)} (peak {plan['peak'] / 1e9:.1f} GB{' each' if gpus > 1 else ''}{note})"

    for gpus in [world_size, *more_gpus]:
        for size in range(len(kinds) + 1):
            found = []
            for combination in itertools.combinations(kinds, size):
                for options in itertools.product(*combination):
                    change = {k: v for option in options for k, v in option.items()}
                    plan = plan_memory(
                        model_config, dataclasses.replace(cfg, **change), gpus, device_bytes, device_type
                    )
                    if plan["peak"] <= plan["budget"] and (change or gpus > world_size):
                        found.append(describe(change, gpus, plan))
                        break
            if found:
                return "these fit: " + "; ".join(found)
    change = {k: v for options in kinds for k, v in options[-1].items()}  # every change at its most
    gpus = max([world_size, *more_gpus])
    plan = plan_memory(model_config, dataclasses.replace(cfg, **change), gpus, device_bytes, device_type)
    peak, phase = max((plan[f"peak_{p.replace(' ', '_')}"], p) for p in PHASES)
    parts = sorted(PHASES[phase], key=lambda k: -plan[k])[:3]
    biggest = ", ".join(f"{PART_LABELS[k]} {plan[k] / 1e9:.1f} GB" for k in parts)
    return (f"nothing fits: even with {describe(change, gpus, plan).split(' (')[0] or 'every change'}, the {phase} "
            f"peak is {peak / 1e9:.1f} GB, mostly {biggest}")  # fmt: skip


# ----------------------------------------------------------------------------------------------
# F. Several GPUs: torchrun + FSDP2. Each rank holds whole groups of every mini-batch. What the paper
# takes over a mini-batch (the candidates' entropies behind tau_h, the kept-token count, the
# 20-Entropy threshold, GRPO's answer count) and what is logged is taken over every rank, and the
# gradients are summed, so the update does not depend on the number of processes. In one process
# every function here is the identity.


def rank_and_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def comm_device() -> torch.device:
    """NCCL moves CUDA tensors, gloo CPU ones."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_sum(values: list) -> list[float]:
    """Sums over every rank of a list of numbers, in float64."""
    values = [float(v) for v in values]
    if not dist.is_initialized():
        return values
    total = torch.tensor(values, dtype=torch.float64, device=comm_device())
    dist.all_reduce(total)
    return total.tolist()


def all_cat(t: torch.Tensor) -> torch.Tensor:
    """A 1-D tensor of every rank, concatenated in rank order; sizes may differ from rank to rank."""
    if not dist.is_initialized():
        return t
    world, device = dist.get_world_size(), comm_device()
    sizes = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([t.numel()], device=device))
    longest = int(max(sizes))
    parts = [torch.empty(longest, dtype=t.dtype, device=device) for _ in range(world)]
    dist.all_gather(parts, F.pad(t.to(device), (0, longest - t.numel())))  # all_gather wants equal sizes
    return torch.cat([part[: int(n)] for part, n in zip(parts, sizes, strict=True)]).to(t.device)


def all_records(records: list) -> list:
    """Python records of every rank, in rank order."""
    if not dist.is_initialized():
        return records
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, records)
    return [r for part in gathered for r in part]


def barrier():
    if dist.is_initialized():
        dist.barrier()


def my_share(items: list, mini_batches: int) -> list:
    """This rank's prompts of a step: its slice of every mini-batch, so that mini-batch k holds the
    same prompts as in one process."""
    rank, world = rank_and_world()
    size = len(items) // mini_batches // world
    return [x for k in range(mini_batches) for x in items[(k * world + rank) * size : (k * world + rank + 1) * size]]


def start_distributed(cfg: Config) -> torch.device:
    """Under torchrun: the process group (NCCL on CUDA, gloo with --device cpu) and this rank's device."""
    if int(os.environ.get("WORLD_SIZE", 1)) == 1:
        return resolve_device(cfg)
    cuda = cfg.device != "cpu" and torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    timeout = datetime.timedelta(minutes=cfg.dist_timeout_min)  # a rank done early waits for the slowest rollouts
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timeout, device_id=device if cuda else None)
    if dist.get_rank() > 0:
        sys.stdout = open(os.devnull, "w")  # rank 0 speaks for all; errors still reach stderr
    return device


def shard_model(model, bf16: bool):
    """FSDP2: every decoder layer is a group, the root (embeddings, final norm, tied LM head) the last.
    Gradients are summed over ranks, not averaged: each rank's loss already divides by the global count.
    With bf16, FSDP gathers bf16 copies of the weights; the sharded master weights stay fp32."""
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    precision = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else None
    for layer in model.model.layers:
        fully_shard(layer, mp_policy=precision or MixedPrecisionPolicy())
    fully_shard(model, mp_policy=precision or MixedPrecisionPolicy())
    for group in (m for m in model.modules() if isinstance(m, FSDPModule)):
        group.set_gradient_divide_factor(1.0)
        group.set_force_sum_reduction_for_comms(True)  # a plain sum: gloo has no pre-multiplied one
    model.sharded_body = lambda **kwargs: model.base_model(**kwargs)  # sequence_logp calls the body alone,
    register_fsdp_forward_method(model, "sharded_body")  # which must still gather the root's weights
    return model


def load_sharded_model(name: str, device: torch.device, tokenizer, seed: int = 0, bf16: bool = False):
    """Every rank builds the model on the meta device and shards it; rank 0 alone reads the weights and
    sends each rank its shards, so no other rank ever holds the whole model (8 x 59 GB of RAM for 14B)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from transformers import AutoModelForCausalLM

    whole = load_model(name, torch.device("cpu"), tokenizer, seed) if dist.get_rank() == 0 else None
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(load_model_config(name))
    shard_model(model, bf16).to_empty(device=device)
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(model, whole.state_dict() if whole else {}, options=options)
    for key, buffer in model.named_buffers():  # not in a state dict: the rotary frequencies
        if whole:
            buffer.copy_(whole.get_buffer(key))
        dist.broadcast(buffer, src=0)
    generation_config = [whole.generation_config if whole else None]  # its EOS ids
    dist.broadcast_object_list(generation_config, src=0)
    model.generation_config = generation_config[0]
    return model


@contextmanager
def unsharded(model):
    """Whole weights on every rank for the rollouts: generate then runs no collective per token, so a
    rank whose answers end early never waits inside a forward for the others. (The alternative,
    generate(synced_gpus=True), gathers every layer for every token: 3x slower on CPU here.)"""
    from torch.distributed.fsdp import FSDPModule

    groups = [m for m in model.modules() if isinstance(m, FSDPModule)]
    if not groups:
        yield
        return
    model.set_reshard_after_forward(False)
    for group in groups:
        group.unshard()
    try:
        yield
    finally:
        for group in groups:
            group.reshard()
        model.set_reshard_after_forward(True)
        model.set_reshard_after_forward(False, recurse=False)  # FSDP2's default for the root


def sharded_state(model, optimizer, folder: Path) -> dict | None:
    """Under FSDP2 (every rank calls it): the whole weights, on rank 0, for save_pretrained, and each
    rank's optimizer shard written to folder/optimizer with torch.distributed.checkpoint."""
    if not dist.is_initialized():
        return None
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    weights = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    dcp.save({"optimizer": get_optimizer_state_dict(model, optimizer)}, checkpoint_id=folder / "optimizer")
    if getattr(model.config, "tie_word_embeddings", False):
        weights.pop("lm_head.weight", None)  # the same tensor as the embeddings
    return weights


def load_sharded_optimizer(model, optimizer, folder: Path):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    state = {"optimizer": get_optimizer_state_dict(model, optimizer)}
    dcp.load(state, checkpoint_id=folder / "optimizer")
    set_optimizer_state_dict(model, optimizer, state["optimizer"])


# ----------------------------------------------------------------------------------------------
# G. Trackers: --report-to wandb|trackio|tensorboard (curves of finished runs: plot.py).


def numbers(metrics: dict) -> dict:
    """What a tracker plots: the numeric metrics (tau_h is None at steps without candidates); step goes apart."""
    return {k: v for k, v in metrics.items() if k != "step" and isinstance(v, int | float)}


class Tracker(NamedTuple):
    log: Callable[[dict, int], None]  # (metrics, step)
    finish: Callable[[], None]


def open_tracker(cfg: Config, config_dict: dict) -> Tracker:
    """--report-to: wandb and trackio share one API; tensorboard writes to output_dir/tensorboard; none: nothing."""
    kind = cfg.report_to
    if kind == "none":
        return Tracker(lambda metrics, step: None, lambda: None)
    try:  # imported only when chosen: every tracker is optional
        if kind == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter  # raises ImportError without the tensorboard package
        else:
            lib = importlib.import_module(kind)
    except ImportError:
        raise SystemExit(f"--report-to {kind} needs the {kind} package: pip install {kind}") from None
    out = Path(cfg.output_dir)
    if kind == "tensorboard":
        writer = SummaryWriter(log_dir=str(out / "tensorboard"))
        print(f"tensorboard: tensorboard --logdir {out / 'tensorboard'}")
        writer.add_text("config", json.dumps(config_dict, indent=2))

        def log(metrics: dict, step: int):
            for key, value in numbers(metrics).items():
                writer.add_scalar(key, value, step)

        return Tracker(log, writer.close)
    where = {"dir": str(out)} if kind == "wandb" else {}  # trackio keeps its runs in its own local database
    lib.init(project="stapo", name=out.resolve().name, config=config_dict, **where)
    return Tracker(lambda metrics, step: lib.log(numbers(metrics), step=step), lib.finish)


if __name__ == "__main__":
    main()
