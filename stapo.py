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

Sections 1-3 (config, the paper's math, one training step) read top to bottom; 4 is the loop; the
appendix is support code. Under torchrun (FSDP2) mini-batch statistics are taken over all ranks with
all_sum / all_cat (the identity in one process). Left out on purpose: vLLM (HF generate is slower but
readable), sequence packing, multi-node launch scripts, length penalties.

Run:   python stapo.py --model Qwen/Qwen3-1.7B-Base                           (one GPU)
       python stapo.py --model tiny --dataset toy --steps 3                   (CPU smoke run, no downloads)
       python stapo.py --model tiny-sft --dataset toy --steps 120 --lr 1e-3   (CPU demo: tokens silenced)
       torchrun --nproc_per_node 8 stapo.py --model Qwen/Qwen3-8B-Base        (8 GPUs, one node)
Test:  pytest -q
"""

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
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

if not {"PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF"} & set(os.environ):  # read when CUDA starts, later
    os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"  # less fragmentation near a full card

# ==============================================================================================
# 1. Config: every knob, one place. Field help is the --help text.


def knob(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass
class Config:
    # model and data
    model: str = knob("Qwen/Qwen3-1.7B-Base", "HF id or folder; tiny: a random CPU model (P 8, 64 new tokens "
                      "unless given); tiny-sft: tiny, first taught the answer format (the CPU demo)")  # fmt: skip
    dataset: str = knob("BytedTsinghua-SIA/DAPO-Math-17k", "Hub id, local .jsonl/.json/.parquet, or toy")
    dataset_config: str | None = knob(None, "Hub dataset config name")
    split: str = knob("train", "dataset split (local files: train)")
    problem_key: str | None = knob(None, "column with the problem text")
    answer_key: str | None = knob(None, "column with the gold answer")
    prompt_format: Literal["chat", "plain"] = knob("chat", "the tokenizer's chat template, or plain text")
    output_dir: str = knob("runs/stapo", "metrics, samples, checkpoints")
    resume: str | None = knob(None, "checkpoint folder to continue from")
    seed: int = knob(0, "seed of data order and sampling")
    device: str = knob("auto", "auto | cpu | cuda | cuda:N")
    precision: Literal["auto", "fp32", "bf16-autocast"] = knob("auto", "auto: bf16 autocast on CUDA, fp32 on CPU")
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
    mask: Literal["s2t", "none", "high-entropy"] = knob(
        "s2t", "s2t: STAPO; none: JustRL, GRPO; high-entropy: 20-Entropy"
    )
    tau_p: float = knob(0.002, "probability below which a token of a correct answer is a candidate")
    q: float = knob(0.75, "entropy quantile over the candidates that sets tau_h")
    entropy_top: float = knob(0.2, "share of tokens kept by --mask high-entropy")
    # loss and optimisation
    loss_agg: Literal["token", "sequence"] = knob("token", "token: mean over kept tokens (DAPO, STAPO); sequence: GRPO")
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
    gradient_checkpointing: Literal["auto", "on", "off"] = knob(
        "auto", "recompute the body in backward; auto: if needed"
    )
    gpu_memory_gb: float = knob(0.0, "memory to plan for; 0: what is free on the device (--dry-run: 80)")
    dry_run: bool = knob(False, "print the memory plan from the model's config alone and exit")
    gpus: int = knob(1, "GPUs to plan for with --dry-run (a torchrun run plans for its processes)")
    # logging and checkpoints
    save_every: int = knob(50, "checkpoint every N steps (and at the end)")
    report_to: Literal["none", "wandb", "trackio", "tensorboard"] = knob("none", "also send the metrics to a tracker")
    log_samples: int = knob(4, "completions written to samples.jsonl per step")


TINY = ("tiny", "tiny-sft")  # random; then taught the answer format (teach_format): the CPU demo
TINY_DEFAULTS = {"prompts_per_step": 8, "max_new_tokens": 64}  # --model tiny: seconds per step on a CPU


def uses_bf16(cfg: Config, device: torch.device) -> bool:  # bf16 compute over fp32 master weights
    return cfg.precision == "bf16-autocast" or (cfg.precision == "auto" and device.type == "cuda")


# ==============================================================================================
# 2. The paper's math, on plain tensors.
# Shape legend: P prompts per step, G samples each, B = P*G, T completion tokens, V vocabulary,
# D hidden size.


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-6) -> torch.Tensor:
    """rewards (B,) -> advantages (B,): z-score inside each group of G samples of one prompt.
    A group whose rewards are all equal carries no signal and gets A = 0."""
    groups = rewards.float().view(-1, group_size)  # (P, G)
    mean, std = groups.mean(1, keepdim=True), groups.std(1, keepdim=True)  # (P, 1); std unbiased (torch's default)
    return ((groups - mean) / (std + eps)).view(-1)  # (B,); std = 0 gives exactly 0


def _chunk_logp_entropy(hidden, weight, targets, temperature: float, with_entropy: bool):
    """hidden (n, D), weight (V, D), targets (n,) -> logp (n,), entropy (n,) or None."""
    logits = F.linear(hidden, weight).float()  # (n, V) fp32
    logprobs = logits.div_(temperature).log_softmax(-1)  # (n, V): the sampler's, before top-p (in place: no copy)
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


def train_step(model, tokenizer, optimizer, problems: list[dict], step: int, cfg: Config) -> tuple[dict, dict]:
    """One rollout batch and its updates. Returns (metrics, this process's records for the jsonl files)."""
    G = cfg.group_size
    # 1. rollouts: every problem G times
    t0 = time.time()
    examples = pick_problems(problems, step, cfg)  # this step's problems (under torchrun, this rank's share)
    prompts = [e["prompt_ids"] for e in examples for _ in range(G)]  # B prompts
    rollouts = generate(model, tokenizer, prompts, cfg, f"step {step + 1} rollouts")
    B, completions = len(prompts), zip(rollouts.completions, rollouts.completion_mask, strict=True)
    texts = [tokenizer.decode(c[m], skip_special_tokens=True) for c, m in completions]
    # 2. rewards, 3. advantages
    golds = [e["answer"] for e in examples for _ in range(G)]
    rewards = torch.tensor([float(verify(t, g)) for t, g in zip(texts, golds, strict=True)])  # (B,)
    advantages = group_advantages(rewards, G)  # (B,)
    gen_s = time.time() - t0

    # 4. p and H under the rollout policy, then the S2T mask and 5. the clipped updates
    t0 = time.time()
    old_logp, entropy = score(model, rollouts, list(range(B)), cfg)  # (B, T) each
    logp_s = time.time() - t0
    stats, silenced = ppo_update(model, optimizer, rollouts, old_logp, entropy, advantages, cfg)
    train_s = time.time() - t0

    # Metrics of the whole batch: sums over every rank (all_sum is the identity in one process).
    n, reward, tokens, H, truncated, zero_std, spurious, clipped, kept, loss = all_sum([
        B, rewards.sum(), rollouts.completion_mask.sum(), entropy[rollouts.completion_mask].sum(),
        rollouts.truncated.sum(), (rewards.view(-1, G).std(1) == 0).sum(), len(silenced), stats["clipped"],
        stats["n_kept_tokens"], stats["loss"],  # each rank's loss is its share of the global sum
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
    samples = [{"step": step + 1, "problem": examples[i // G]["problem"], "gold": golds[i], "reward": rewards[i].item(),
                "completion": texts[i]} for i in range(min(cfg.log_samples, B))]  # fmt: skip
    records = []
    for s in silenced:  # each silenced token with 8 tokens of context on each side, decoded
        ids, t = rollouts.completions[s["sample"], rollouts.completion_mask[s["sample"]]].tolist(), s["position"]
        left, token, right = (tokenizer.decode(ids[a:b]) for a, b in ((max(0, t - 8), t), (t, t + 1), (t + 1, t + 9)))
        records.append({"step": step + 1, "token": token, "left": left, "right": right, **s})
    return metrics, {"samples": samples, "spurious": records}


def ppo_update(model, optimizer, rollouts, old_logp, entropy, advantages, cfg: Config):
    """The mini-batch updates of one step. Returns step statistics and the silenced tokens."""
    stats = {"n_candidates": 0, "tau_h": [], "clipped": 0, "n_kept_tokens": 0, "loss": 0.0, "grad_norm": []}
    silenced = []
    B = len(rollouts.prompts)
    size = B // cfg.mini_batches
    device = next(model.parameters()).device
    for k in range(cfg.mini_batches):
        rows = list(range(k * size, (k + 1) * size))
        # p and H from the policy at the start of this mini-batch (= the rollout policy for the first).
        logp_now, entropy_now = (old_logp, entropy) if k == 0 else score(model, rollouts, rows, cfg)
        completion_mask = torch.zeros_like(rollouts.completion_mask)  # (B, T): this mini-batch's tokens only
        completion_mask[rows] = rollouts.completion_mask[rows]
        keep, s2t = loss_mask(logp_now, entropy_now, advantages, completion_mask, cfg)  # (B, T)
        num_kept = loss_denominator(keep, cfg.loss_agg)  # of the whole mini-batch, never of a micro-batch
        if s2t is not None:
            stats["n_candidates"] += s2t.n_candidates
            stats["tau_h"] += [s2t.tau_h] if s2t.tau_h is not None else []
            for i, t in s2t.spurious.nonzero().tolist():  # answer i, position t
                p, H, A = math.exp(logp_now[i, t]), float(entropy_now[i, t]), float(advantages[i])
                silenced.append({"p": p, "H": H, "A": A, "tau_h": s2t.tau_h, "sample": i, "position": t})

        for mb in micro_batches(rollouts, rows, cfg.micro_batch_tokens):
            logp, _ = sequence_logp(model, rollouts, mb, cfg)  # (b, T')
            T = logp.shape[1]
            old, kept, adv = (x.to(device) for x in (old_logp[mb, :T], keep[mb, :T], advantages[mb]))
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
    """Clip the gradient norm, step, free the gradients (their memory serves generation); the norm before."""
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


def left_pad(seqs: list[torch.Tensor], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention_mask), both (b, max_len), padded on the left as generate expects."""
    width = max(len(s) for s in seqs)
    ids, mask = torch.full((len(seqs), width), pad_id), torch.zeros((len(seqs), width), dtype=torch.long)
    for row, s in enumerate(seqs):
        ids[row, width - len(s) :], mask[row, width - len(s) :] = s, 1
    return ids, mask


def sequence_logp(model, rollouts: Rollouts, rows: list[int], cfg: Config, with_entropy: bool = False):
    """logp (b, T) of the sampled tokens of `rows` (and entropy), T = their longest completion. Layout:
    [left pad | prompt | completion | right pad]; position ids count real tokens only, exactly as generate()
    numbered the left-padded prompt, so training log-probs equal sampling ones."""
    device = next(model.parameters()).device
    run = rows or [0]  # torchrun: an empty micro-batch still runs a forward, in step with busier ranks
    T = int(rollouts.completion_mask[run].sum(1).max())
    prompt_ids, prompt_mask = left_pad([rollouts.prompts[r] for r in run], 0)
    completions = rollouts.completions[run, :T]  # (b, T)
    input_ids = torch.cat([prompt_ids, completions], 1).to(device)  # (b, L)
    attention_mask = torch.cat([prompt_mask, rollouts.completion_mask[run, :T].long()], 1).to(device)  # (b, L)
    position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)  # (b, L)
    bf16 = uses_bf16(cfg, device)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        body = getattr(model, "sharded_body", model.base_model)  # under FSDP2, the body with the root's gather
        hidden = body(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                      use_cache=False).last_hidden_state  # (b, L, D)  # fmt: skip
        hidden = hidden[: len(rows), prompt_ids.shape[1] - 1 : -1]  # (b, T, D): the states that predict the tokens
        # The head is cast once per micro-batch: autocast would cast it again for every chunk, and in backward.
        weight = model.get_output_embeddings().weight  # (V, D)
        weight = weight.to(torch.bfloat16) if bf16 else weight
        targets = completions[: len(rows)].to(device)  # (b, T)
        return token_logp(hidden, weight, targets, cfg.temperature, cfg.logit_chunk, with_entropy)


def micro_batches(rollouts: Rollouts, rows: list[int], token_budget: int) -> list[list[int]]:
    """Split rows into micro-batches whose padded size (rows x longest) fits token_budget; sorting by
    length first keeps padding small. Under torchrun each rank runs as many as the busiest (empty ones)."""
    lengths = [len(p) + int(n) for p, n in zip(rollouts.prompts, rollouts.completion_mask.sum(1), strict=True)]
    batches, current = [], []
    for r in sorted(rows, key=lambda r: lengths[r]):
        if current and (len(current) + 1) * lengths[r] > token_budget:
            batches.append(current)
            current = []
        current.append(r)
    batches += [current] if current else []
    return batches + [[]] * (int(all_cat(torch.tensor([len(batches)])).max()) - len(batches))


@torch.no_grad()
def score(model, rollouts: Rollouts, rows: list[int], cfg: Config):
    """logp and entropy (B, T) of the given rows under the current policy, without gradient."""
    logp, entropy = torch.zeros(rollouts.completions.shape), torch.zeros(rollouts.completions.shape)
    for mb in micro_batches(rollouts, rows, cfg.micro_batch_tokens):
        lp, ent = sequence_logp(model, rollouts, mb, cfg, with_entropy=True)  # (b, T')
        logp[mb, : lp.shape[1]], entropy[mb, : ent.shape[1]] = lp.cpu(), ent.cpu()
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
    plan, cfg = plan_or_stop(load_model_config(cfg.resume or cfg.model), cfg, device, world)
    same_run = check_run_folder(cfg)  # before anything slow, and before anything is written
    torch.manual_seed(cfg.seed + rank)  # every rank samples its own answers
    random.seed(cfg.seed + rank)
    tokenizer = load_tokenizer(cfg.resume or cfg.model)
    problems = load_problems(cfg, tokenizer)
    if world == 1:
        model = load_model(cfg.resume or cfg.model, device, tokenizer, cfg.seed)
    else:  # torchrun: sharded as it loads; only rank 0 reads the whole model
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
            metrics, records = train_step(model, tokenizer, optimizer, problems, step, cfg)
            scheduler.step()
            records = {name: all_records(r) for name, r in records.items()}  # every rank's, in rank order
            if rank == 0:  # one writer of the log files
                tqdm.write(log_line(metrics))
                for name, rows in (("metrics", [metrics]), *records.items()):
                    append_jsonl(out / f"{name}.jsonl", rows)
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


def log_line(m: dict) -> str:
    tau_h = f"{m['tau_h']:.3f}" if m["tau_h"] is not None else "  -  "
    return (
        f"step {m['step']:>4}/{m['steps']} | reward {m['reward']:.3f} | zero-std {m['frac_zero_std']:.2f} | "
        f"len {m['len_mean']:6.1f} | trunc {m['truncated_frac']:.2f} | H {m['entropy']:.3f} | "
        f"silenced {m['n_spurious']:>3}/{m['n_candidates']:<4} ({100 * m['spurious_frac']:.4f}%) tau_h {tau_h} | "
        f"clip {100 * m['clip_frac']:.2f}% | loss {m['loss']:+.4f} | gnorm {m['grad_norm']:.3f} | "
        f"lr {m['lr']:.1e} | gen {m['gen_s']:.1f}s train {m['train_s']:.1f}s"
    )


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


# ==============================================================================================
# Appendix: support code.
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
    s = re.sub(r",\\! *", ",", s.replace("{,}", ","))  # 11,\! 111 and 1{,}000: thousands, before \! and \{ go
    s = _DEGREES.sub("", s)  # ^\circ before \circ
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
PROBLEM_KEYS, ANSWER_KEYS = ("problem", "question", "prompt"), ("answer", "final_answer", "ground_truth")


def toy_problems() -> list[dict]:
    """A dataset for CPU runs that needs no files: a digit written 40 times, and the answer is the digit.
    Two problems, so that a 2-layer model learns them with RL in a minute (with ten it learns nothing)."""
    return [{"problem": d * 40, "answer": d} for d in "01"]


def row_to_example(row: dict, problem_key: str | None = None, answer_key: str | None = None) -> dict | None:
    """One dataset row -> {"problem", "answer"}, or None when it has no usable problem or answer."""
    example = parse_row(row, problem_key, answer_key)
    return example if isinstance(example, dict) else None


def parse_row(row: dict, problem_key: str | None = None, answer_key: str | None = None) -> dict | str:
    """One dataset row -> {"problem", "answer"}, or why it is unusable. Recognised: problem/question/prompt
    (a string or a chat list), answer/final_answer/ground_truth, DAPO's reward_model.ground_truth, or the
    last \\boxed{} of a solution."""
    problem = next((row[k] for k in ([problem_key] if problem_key else PROBLEM_KEYS) if k in row), None)
    if isinstance(problem, list):  # chat messages: the last user turn
        turns = [m.get("content") for m in problem if isinstance(m, dict) and m.get("role", "user") == "user"]
        problem = turns[-1] if turns else None
    if answer_key:
        answer = row.get(answer_key)
    elif isinstance(row.get("reward_model"), dict):  # DAPO
        answer = row["reward_model"].get("ground_truth")
    elif any(k in row for k in ANSWER_KEYS):
        answer = next((row[k] for k in ANSWER_KEYS if row.get(k) is not None), None)
    else:  # a worked solution (MATH) or a bare gold (open-r1's DAPO copy)
        answer = row.get("solution")
        answer = extract_boxed(answer) if isinstance(answer, str) and "\\boxed" in answer else answer
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


def load_problems(cfg: Config, tokenizer=None) -> list[dict]:
    """Problems with gold answers from toy, a local file or the Hub, unique by text; with a tokenizer,
    those whose prompt fits --max-prompt-tokens, with their token ids."""
    import datasets

    path, kind = Path(cfg.dataset), {".json": "json", ".parquet": "parquet"}.get(Path(cfg.dataset).suffix)
    if path.suffix in (".jsonl", ".json", ".parquet") and not path.is_file():
        sys.exit(f"--dataset {path}: no such file")
    if path.exists() and path.suffix not in (".jsonl", ".json", ".parquet"):
        sys.exit(f"--dataset {path}: local files are read as .jsonl, .json (a list of objects) or .parquet")
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # a file it cannot read: our one line says so
    try:
        if cfg.dataset == "toy":
            rows = toy_problems()
        elif path.suffix == ".jsonl":  # read here: an error names the line
            rows = [row for _, row in jsonl_objects(path)[0]]
        else:  # datasets reads .json and .parquet files, and the Hub
            rows = list(datasets.load_dataset(kind, data_files=str(path), split="train") if kind else
                        datasets.load_dataset(cfg.dataset, cfg.dataset_config, split=cfg.split))  # fmt: skip
    except Exception as e:  # pyarrow's and the Hub's many error types: one line that says what to do
        why = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
        hub = "Offline? Pass a local file: --dataset path/to/file.jsonl, or --model tiny --dataset toy"
        what = "cannot be read" if kind else "could not load it from the Hugging Face Hub"
        sys.exit(f"--dataset {cfg.dataset}: {what} ({why}); {'check the file' if kind else hub}")
    if not rows:
        sys.exit(f"--dataset {cfg.dataset}: the file is empty")
    examples = rows if cfg.dataset == "toy" else usable_examples(rows, cfg)
    if tokenizer is None:
        return examples
    problems = [{**e, "prompt_ids": encode_prompt(e["problem"], tokenizer, cfg.prompt_format)} for e in examples]
    fitting = [p for p in problems if len(p["prompt_ids"]) <= cfg.max_prompt_tokens]
    if not fitting:
        shortest = min(len(p["prompt_ids"]) for p in problems)
        sys.exit(f"--max-prompt-tokens {cfg.max_prompt_tokens}: no prompt fits (the shortest has {shortest} tokens)")
    print(f"data: {len(fitting)} problems with prompts of at most {cfg.max_prompt_tokens} tokens")
    return fitting


def usable_examples(rows, cfg: Config) -> list[dict]:
    """Examples of the usable rows, unique by problem; the rows skipped are counted, with the first reason."""
    columns = set().union(*(row.keys() for row in rows[:100]))
    for key, flag in ((cfg.problem_key, "--problem-key"), (cfg.answer_key, "--answer-key")):
        if key and key not in columns:
            sys.exit(f"{flag} {key!r} is not a column of {cfg.dataset}; columns: {sorted(columns)}")
    if not (cfg.problem_key or set(PROBLEM_KEYS) & columns) or not (
        cfg.answer_key or {*ANSWER_KEYS, "reward_model", "solution"} & columns
    ):
        sys.exit(f"{cfg.dataset}: no problem/answer columns recognised among {sorted(columns)}; "
                 "name them with --problem-key and --answer-key")  # fmt: skip
    examples, seen, skipped = [], set(), []
    for number, row in enumerate(rows, 1):
        example = parse_row(row, cfg.problem_key, cfg.answer_key)
        if isinstance(example, str):
            skipped.append(f"row {number}: {example}")
        elif example["problem"] not in seen:  # the Hub's DAPO-Math-17k repeats each problem ~100x
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
    text = build_prompt(problem, tokenizer, prompt_format)
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"])


def pick_problems(problems: list, step: int, cfg: Config) -> list:
    """The P problems of a step: a fresh seeded permutation each epoch, so a resumed run continues exactly
    from the step number alone. Under torchrun, this rank's slice of every mini-batch."""
    picked, orders = [], {}
    for pos in range(step * cfg.prompts_per_step, (step + 1) * cfg.prompts_per_step):
        epoch, i = divmod(pos, len(problems))
        if epoch not in orders:
            generator = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
            orders[epoch] = torch.randperm(len(problems), generator=generator)
        picked.append(problems[orders[epoch][i]])
    return my_share(picked, cfg.mini_batches)


# ----------------------------------------------------------------------------------------------
# C. Models and rollouts: a Hub or local checkpoint, or a tiny random Qwen3 with a byte-level tokenizer.


@torch.no_grad()
def generate(model, tokenizer, prompts: list[torch.Tensor], cfg: Config, desc: str = "rollouts",
             kv_cache_bytes: float | None = None) -> Rollouts:  # fmt: skip
    """One sampled completion per prompt, in as few generate calls as the KV-cache budget allows."""
    from transformers import GenerationConfig

    device, eos = next(model.parameters()).device, eos_token_ids(model, tokenizer)
    gen_config = GenerationConfig(do_sample=True, temperature=cfg.temperature, top_p=cfg.top_p, top_k=0,
                                  max_new_tokens=cfg.max_new_tokens, eos_token_id=eos,
                                  pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    chunk = sequences_per_generate(model, max(len(p) for p in prompts), cfg, kv_cache_bytes)
    calls, completions, was_training = math.ceil(len(prompts) / chunk), [], model.training
    progress = DecodeProgress(f"{desc} ({len(prompts)} sequences, {calls} calls)", calls, cfg.max_new_tokens)
    with progress, unsharded(model.eval()):  # FSDP2: whole weights (bf16 with autocast) on every rank
        # bf16: sample from a bf16 copy, not under autocast, so that keys and values are both bf16 (Qwen3's
        # fp32 q/k-norm weights make autocast's keys fp32) and no decoding step pays for casts.
        copy = uses_bf16(cfg, device) and next(model.parameters()).dtype != torch.bfloat16
        sampler = bf16_copy(model) if copy else model
        for start in range(0, len(prompts), chunk):
            ids, mask = left_pad(prompts[start : start + chunk], tokenizer.pad_token_id)
            out = sampler.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                streamer=progress,
                generation_config=gen_config,
                synced_gpus=False,
            )  # (b, L + new); unsharded: no sync
            completions += list(out[:, ids.shape[1] :].cpu())
        del sampler  # the copy lives for one call: its memory serves the update
    model.train(was_training)
    # Cut each completion after its first EOS, which stays in (it is the answer's last action).
    width = max(1, max(len(c) for c in completions))
    tokens = torch.full((len(completions), width), tokenizer.pad_token_id, dtype=torch.long)  # (B, T)
    completion_mask = torch.zeros((len(completions), width), dtype=torch.bool)  # (B, T)
    truncated = torch.zeros(len(completions), dtype=torch.bool)  # (B,): no EOS within max_new_tokens
    for row, c in enumerate(completions):
        hits = torch.isin(c, torch.tensor(eos)).nonzero()
        n = int(hits[0]) + 1 if len(hits) else len(c)
        tokens[row, :n], completion_mask[row, :n], truncated[row] = c[:n], True, not len(hits)
    return Rollouts(prompts, tokens, completion_mask, truncated)


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


class DecodeProgress(tqdm):
    """Decoding steps, as a generate() streamer: a bar in a terminal; in a log file, a status every 30 s
    once the work has run that long (short work prints nothing)."""

    def __init__(self, desc: str, calls: int, max_new_tokens: int, every: float = 30.0):
        every = 0.1 if sys.stderr.isatty() else every
        super().__init__(total=calls * max_new_tokens, desc=desc, unit="tok", leave=False, mininterval=every,
                         delay=every, disable=rank_and_world()[0] > 0)  # fmt: skip
        self.per_call, self.calls = max_new_tokens, 0

    def put(self, ids):  # once with the prompt, then once per decoding step
        self.update(1)

    def end(self):  # a call ends, early when every answer has stopped: count it whole
        self.calls += 1
        self.update(self.calls * self.per_call - self.n)


def eos_token_ids(model, tokenizer) -> list[int]:
    """Every id that ends an answer: Qwen3-Base stops on <|endoftext|>, chat turns end on <|im_end|>."""
    configured = model.generation_config.eos_token_id
    ids = {tokenizer.eos_token_id, *(configured if isinstance(configured, list) else [configured])}
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    ids |= {im_end} if isinstance(im_end, int) and im_end != tokenizer.unk_token_id else set()
    return sorted(i for i in ids if i is not None)


def build_tiny_tokenizer():
    """Byte-level tokenizer (256 bytes + Qwen's three special tokens): any text, no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE({c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}, []))
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
    """A 2-layer Qwen3 shaped like the real one (GQA, tied embeddings), for the tiny tokenizer:
    256 bytes, then <|endoftext|> (256, also pad), <|im_start|>, <|im_end|> (258)."""
    from transformers import Qwen3Config

    return Qwen3Config(
        vocab_size=259, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=2048, tie_word_embeddings=True,
        eos_token_id=[256, 258], pad_token_id=256, bos_token_id=None,
    )  # fmt: skip


def teach_format(model, tokenizer, steps: int = 300):
    """--model tiny-sft: supervised steps on the toy prompts with the answer \\boxed{d}, d a random digit,
    so that RL starts near reward 0.1 as a base model does on math (a random model never writes \\boxed{})."""
    end = [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    prompts = [encode_prompt(e["problem"], tokenizer) for e in toy_problems()]
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in tqdm(range(steps), desc="tiny-sft: teaching the answer format", leave=False, disable=None):
        answers = [tokenizer(f"\\boxed{{{random.randint(0, 9)}}}", add_special_tokens=False)["input_ids"] + end
                   for _ in range(16)]  # fmt: skip
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

    return tiny_config() if name in TINY else from_hub(lambda: AutoConfig.from_pretrained(name), name)


def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    tokenizer = build_tiny_tokenizer() if name in TINY else from_hub(lambda: AutoTokenizer.from_pretrained(name), name)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    return tokenizer


def load_model(name: str, device: torch.device, tokenizer, seed: int = 0, dtype=torch.float32):
    """The policy, in fp32 to train: at lr 1e-6, bf16 master weights would drop the update (eval: bf16)."""
    from transformers import AutoModelForCausalLM, Qwen3ForCausalLM

    if name in TINY:
        torch.manual_seed(seed)
        model = Qwen3ForCausalLM(tiny_config())
        return (teach_format(model, tokenizer) if name == "tiny-sft" else model).to(device, dtype)
    load = lambda: AutoModelForCausalLM.from_pretrained(name, dtype=dtype, use_safetensors=True)  # noqa: E731
    return from_hub(load, name).to(device)


def load_policy(name: str, device: torch.device, seed: int = 0, dtype=torch.float32):
    """(model, tokenizer); the model in fp32 unless dtype says otherwise."""
    tokenizer = load_tokenizer(name)
    return load_model(name, device, tokenizer, seed, dtype), tokenizer


def from_hub(load, name: str):
    """load(), with one line instead of a traceback for a missing folder, an unreachable Hub or a damaged file."""
    flag, path = "--resume" if (Path(name) / "trainer_state.pt").exists() else "--model", Path(name)
    if not path.exists() and (name.startswith(("/", ".", "~")) or name.count("/") > 1):
        sys.exit(f"{flag} {name}: no such folder (a path, not a Hub id like Qwen/Qwen3-1.7B-Base)")
    if path.is_dir() and not (path / "config.json").exists():
        latest = max(checkpoints(path), key=checkpoint_step, default=None)
        sys.exit(f"{flag} {name}: no config.json in it, so not a model folder"
                 + (f" (a run folder: pass one of its checkpoints, e.g. {latest})" if latest else ""))  # fmt: skip
    try:
        return load()
    except Exception as e:  # a local folder, whatever its damage (safetensors, json, ...): one line
        if path.exists():
            sys.exit(f"{flag} {name}: cannot be loaded from it ({type(e).__name__}: {str(e).splitlines()[0][:200]})")
        if not isinstance(e, (OSError, ValueError, ConnectionError)):
            raise  # not a loading failure: a bug, shown whole
        sys.exit(f"{flag} {name}: could not load it from the Hugging Face Hub ({type(e).__name__}). Offline? Download "
                 "it where the Hub is reachable and pass the folder: --model path/to/folder. Without any download: "
                 "python stapo.py --model tiny --dataset toy")  # fmt: skip


def quiet_libraries():
    """No progress bars for saving and loading (ours show the rollouts), and each Hub warning once: an
    offline Hub otherwise repeats two lines per retry before the one line that says what to do."""
    import logging

    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    seen = set()  # "Retrying in 2s [Retry 2/5]" is "Retrying in 1s [Retry 1/5]" again
    once = lambda record: (text := re.sub(r"\d+", "N", record.getMessage())) not in seen and not seen.add(text)  # noqa: E731
    logging.getLogger("huggingface_hub.utils._http").addFilter(once)


def resolve_device(cfg: Config) -> torch.device:
    return torch.device(("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device)


# ----------------------------------------------------------------------------------------------
# D. Command line, run folders, checkpoints, log files, trackers

AT_LEAST_1 = ("prompts_per_step", "max_prompt_tokens", "max_new_tokens", "steps", "mini_batches", "gpus",
              "micro_batch_tokens", "save_every", "dist_timeout_min")  # fmt: skip
AT_LEAST_0 = ("kv_cache_gb", "gpu_memory_gb", "warmup_steps", "weight_decay", "logit_chunk", "log_samples", "eps_high")
RULES = {  # flag: (allowed?, what is allowed)
    "group_size": (lambda v: v >= 2, "at least 2: advantages compare the samples of a group"),
    "temperature": (lambda v: v > 0, "above 0"), "lr": (lambda v: v > 0, "above 0"),
    "grad_clip": (lambda v: v > 0, "above 0"), "top_p": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "tau_p": (lambda v: 0 < v < 1, "a probability in (0, 1); the paper uses 0.002"),
    "q": (lambda v: 0 <= v <= 1, "a quantile in [0, 1]; the paper uses 0.75"),
    "entropy_top": (lambda v: 0 < v <= 1, "a share in (0, 1]"), "eps_low": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "dual_clip": (lambda v: v == 0 or v > 1, "0 (off) or above 1; veRL uses 3"),
    "device": (lambda v: re.fullmatch(r"auto|cpu|cuda(:\d+)?", v), "auto, cpu, cuda or cuda:N"),
    **{name: (lambda v: v >= 1, "at least 1") for name in AT_LEAST_1},
    **{name: (lambda v: v >= 0, "at least 0") for name in AT_LEAST_0},
}  # fmt: skip


def parse_args(argv=None) -> Config:
    """Flags from the dataclass, each bad value named in one line before anything loads. With --resume,
    the checkpoint's saved config is the base and the flags given go on top."""
    from transformers import HfArgumentParser

    parser = HfArgumentParser(Config, description=__doc__.split("\n")[0], epilog="curves: python plot.py RUN_DIR ...")
    parser.error = lambda message: parser.exit(2, f"stapo.py: error: {message}\n")  # one line; --help has usage
    argv = sys.argv[1:] if argv is None else argv
    args, flags = vars(parser.parse_args(argv)), {a.split("=")[0][2:].replace("-", "_") for a in argv if a[:2] == "--"}
    given = {k: v for k, v in args.items() if k in flags}
    base = saved_config(Path(given["resume"]), given, parser.error) if given.get("resume") else {}
    tiny = TINY_DEFAULTS if given.get("model", base.get("model")) in TINY else {}  # CPU-sized unless given
    cfg = Config(**{**args, **tiny, **base, **given})
    errors = []
    for name, (ok, allowed) in RULES.items():
        value = getattr(cfg, name)
        if isinstance(value, float) and not math.isfinite(value) or not ok(value):
            finite = isinstance(value, str) or math.isfinite(value)
            errors.append(f"--{name.replace('_', '-')} {value}: must be {allowed if finite else 'a finite number'}")
    for f in (f for f in dataclasses.fields(Config) if getattr(f.type, "__origin__", None) is Literal):
        if getattr(cfg, f.name) not in f.type.__args__:  # a saved config is not checked by argparse
            errors.append(f"--{f.name.replace('_', '-')} {getattr(cfg, f.name)}: must be one of {f.type.__args__}")
    world = int(os.environ.get("WORLD_SIZE", 1))  # torchrun: each process holds whole groups of every mini-batch
    if cfg.prompts_per_step % (max(1, cfg.mini_batches) * world):
        errors.append(f"--prompts-per-step {cfg.prompts_per_step} must be divisible by --mini-batches "
                      f"{cfg.mini_batches}" + (f" x {world} processes" if world > 1 else ""))  # fmt: skip
    if cfg.device.startswith("cuda") and not torch.cuda.device_count() > int(cfg.device[5:] or 0):
        errors.append(f"--device {cfg.device}: this machine has {torch.cuda.device_count()} CUDA devices")
    if cfg.report_to != "none" and importlib.util.find_spec(cfg.report_to) is None:
        errors.append(f"--report-to {cfg.report_to} needs the {cfg.report_to} package: pip install {cfg.report_to}")
    for error in errors:
        parser.error(error)
    return cfg


def saved_config(ckpt: Path, given: dict, error) -> dict:
    """The config a checkpoint was trained with, checked against the flags given with --resume."""
    if not (ckpt / "trainer_state.pt").exists() or checkpoint_step(ckpt) < 0:
        error(f"--resume {ckpt}: " + ("not a checkpoint folder (step-N with a trainer_state.pt, as this trainer "
                                      "writes them)" if ckpt.is_dir() else "no such folder"))  # fmt: skip
    try:
        base = json.loads((ckpt / "stapo_config.json").read_text())
        if not (isinstance(base, dict) and "model" in base):
            raise ValueError
    except (OSError, ValueError):
        error(f"--resume {ckpt}: its stapo_config.json is missing or damaged; resume from another checkpoint")
    saved, world = base.pop("world_size", 1), int(os.environ.get("WORLD_SIZE", 1))
    if saved != world:
        error(f"--resume {ckpt}: written by {saved} process(es), resumed by {world}; an exact resume needs the "
              f"same number: torchrun --nproc_per_node {saved}")  # fmt: skip
    if given.get("model", base["model"]) != base["model"]:
        error(f"--model {given['model']}: {ckpt} holds weights trained from {base['model']}, and those are what "
              "resumes; drop --model, or start a new run")  # fmt: skip
    if given.get("steps", base["steps"]) <= checkpoint_step(ckpt):
        error(f"--steps {given.get('steps', base['steps'])}: {ckpt} is at step {checkpoint_step(ckpt)} already, and "
              "--steps counts all the steps of the run; give more")  # fmt: skip
    names = {f.name for f in dataclasses.fields(Config)}
    return {k: v for k, v in base.items() if k in names} | {"output_dir": str(ckpt.parent)}  # its own run, unless given


LOG_FILES = ("metrics.jsonl", "samples.jsonl", "spurious.jsonl")


def checkpoints(run: Path) -> list[Path]:
    return [p for p in run.glob("step-*") if (p / "trainer_state.pt").exists()]


def checkpoint_step(ckpt: Path) -> int:
    match = re.fullmatch(r"step-(\d+)", Path(ckpt).name)
    return int(match[1]) if match else -1


def check_run_folder(cfg: Config) -> bool:
    """One run, one folder. --resume continues in the checkpoint's own folder from its latest checkpoint
    only; from an earlier one it branches into a new --output-dir. Returns whether this run continues."""
    out, ckpt = Path(cfg.output_dir), Path(cfg.resume) if cfg.resume else None
    latest = max(checkpoints(out), key=checkpoint_step, default=None)
    if ckpt and out.resolve() == ckpt.parent.resolve():
        if latest.resolve() != ckpt.resolve():
            sys.exit(f"--resume {ckpt}: {out} has a later checkpoint, {latest.name}; continuing here would mix two "
                     "histories. Branch into a new folder: --output-dir NEW_FOLDER")  # fmt: skip
        return True
    if latest:
        sys.exit(f"--output-dir {out} already holds a run; continue it with --resume {latest}, or give a new one")
    if any((out / n).exists() for n in (*LOG_FILES, "stapo_config.json")):
        sys.exit(f"--output-dir {out} holds the records of a run that stopped before its first checkpoint; there is "
                 "nothing to resume: move the folder away or give a new --output-dir")  # fmt: skip
    return False


def open_run_folder(cfg: Config, same_run: bool) -> Path:
    """The run folder with stapo_config.json. Nothing is deleted: in the same run, records of steps after the
    checkpoint (the stop lost them) go to <name>.after-step-N.jsonl; a branch starts with its parent's
    records up to the checkpoint."""
    out, ckpt = Path(cfg.output_dir), Path(cfg.resume) if cfg.resume else None
    out.mkdir(parents=True, exist_ok=True)
    for name in LOG_FILES if ckpt else ():
        source, step = (out if same_run else ckpt.parent) / name, checkpoint_step(ckpt)
        records = read_jsonl(source) if source.exists() else []
        kept = [r for r in records if r["step"] <= step]
        torn = source.exists() and not source.read_bytes().endswith(b"\n") and source.stat().st_size > 0
        changed = len(kept) < len(records) or torn  # records after the checkpoint, or a line a kill cut short
        if same_run and changed:
            append_jsonl(out / f"{name[:-6]}.after-step-{step:06d}.jsonl", records[len(kept) :])
        if changed or not same_run:
            replace_file(out / name, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept))
    branch = {"branched_from": str(ckpt.resolve())} if ckpt and not same_run else {}
    replace_file(out / "stapo_config.json", json.dumps(dataclasses.asdict(cfg) | branch, indent=2))
    print(f"config: {out / 'stapo_config.json'}")
    return out


def save_checkpoint(model, tokenizer, optimizer, scheduler, cfg: Config, step: int) -> Path:
    """Write out/step-N atomically: a temporary folder, then one rename. A failed write (a full disk) removes
    it and stops with one line naming the last good checkpoint. Under torchrun every rank calls it; rank 0
    writes, and the optimizer state is saved sharded."""
    out, (rank, world) = Path(cfg.output_dir), rank_and_world()
    final, tmp = out / f"step-{step:06d}", out / f".tmp-step-{step:06d}"
    rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
    rng |= {"cuda": torch.cuda.get_rng_state_all()} if torch.cuda.is_available() else {}
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
            torch.save(state | ({"optimizer": optimizer.state_dict()} if world == 1 else {}), tmp / "trainer_state.pt")
            replace_file(
                tmp / "stapo_config.json", json.dumps(dataclasses.asdict(cfg) | {"world_size": world}, indent=2)
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


def restore_trainer_state(cfg: Config, model, optimizer, scheduler) -> int:
    """Optimizer, schedule and RNG of the checkpoint, then this run's --lr, --weight-decay and --warmup-steps.
    Returns the step to continue from."""
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


def jsonl_objects(path: Path, torn_tail_ok: bool = False) -> tuple[list[tuple[int, dict]], int]:
    """(line number, object) of each non-blank line, and the byte length of the lines kept. Anything but one
    JSON object per UTF-8 line is a one-line SystemExit naming file and line; with torn_tail_ok, a last line
    that a kill during an append cut short (no newline, does not parse) is dropped with a warning instead."""
    data = path.read_bytes()
    lines, objects = data.split(b"\n"), []  # the last item is b"" when the file ends with a newline
    for n, line in enumerate(lines, 1):
        try:
            obj = json.loads(line.decode("utf-8")) if line.strip() else {}
            problem = None if isinstance(obj, dict) else f"a JSON {type(obj).__name__}, not an object"
        except UnicodeDecodeError as e:
            problem = f"not UTF-8 (byte {line[e.start]:#x} at column {e.start + 1})"
        except json.JSONDecodeError as e:
            problem = f"not JSON ({e.msg} at column {e.colno})"
        if problem and torn_tail_ok and n == len(lines):
            print(f"warning: {path}: line {n} is cut short (a crash while writing?); dropped", file=sys.stderr)
            return objects, len(data) - len(line)
        if problem:
            sys.exit(f"{path}: line {n}: {problem}")
        objects += [(n, obj)] if line.strip() else []
    return objects, len(data)


def read_jsonl(path: Path) -> list[dict]:
    """Records of a log file; a torn last line is dropped with a warning."""
    return [record for _, record in jsonl_objects(path, torn_tail_ok=True)[0]]


def replace_file(path: Path, data: str | bytes):
    """Replace a file whole or not at all: a temporary file beside it, flushed to disk, then renamed."""
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


class Tracker(NamedTuple):
    log: Callable[[dict, int], None]  # (metrics, step)
    finish: Callable[[], None]


def open_tracker(cfg: Config, config: dict) -> Tracker:
    """--report-to: one shape for all (init, log the numeric metrics of each step, finish); optional packages."""
    numbers = lambda metrics: {k: v for k, v in metrics.items() if k != "step" and isinstance(v, int | float)}  # noqa: E731
    out = Path(cfg.output_dir)
    try:
        if cfg.report_to == "none":
            return Tracker(lambda metrics, step: None, lambda: None)
        if cfg.report_to == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter  # raises ImportError without the tensorboard package

            writer = SummaryWriter(log_dir=str(out / "tensorboard"))
            writer.add_text("config", json.dumps(config, indent=2))
            print(f"tensorboard: tensorboard --logdir {out / 'tensorboard'}")
            return Tracker(lambda m, step: [writer.add_scalar(k, v, step) for k, v in numbers(m).items()], writer.close)
        lib = importlib.import_module(cfg.report_to)  # wandb and trackio share one API
    except ImportError:
        raise SystemExit(
            f"--report-to {cfg.report_to} needs the {cfg.report_to} package: pip install {cfg.report_to}"
        ) from None
    lib.init(
        project="stapo",
        name=out.resolve().name,
        config=config,
        **({"dir": str(out)} if cfg.report_to == "wandb" else {}),
    )
    return Tracker(lambda metrics, step: lib.log(numbers(metrics), step=step), lib.finish)


# ----------------------------------------------------------------------------------------------
# E. Memory plan: the bytes of each part and the peak of each phase, from a model config alone.
# GB here is 1e9 bytes; D hidden size, M MLP width, L layers, H and K query and key/value heads of width d.

HEADROOM = 0.9  # plan to 90 % of what is free: the CUDA allocator rounds and fragments
PHASES = {  # the parts alive at the peak of each phase of a step
    "generation": ("weights", "adamw", "rollout_weights", "gathered_model", "kv_cache", "sampling"),
    "scoring": ("weights", "adamw", "autocast_weights", "gathered_layers", "forward_working", "lm_head_chunk"),
    "update": ("weights", "gradients", "adamw", "autocast_weights", "gathered_layers", "activations", "lm_head_chunk"),
    "optimizer step": ("weights", "gradients", "adamw", "optimizer_temporaries"),
}
PART_LABELS = {
    "weights": "fp32 weights", "gradients": "fp32 gradients", "adamw": "AdamW states (2 x fp32)",
    "optimizer_temporaries": "AdamW step temporaries", "autocast_weights": "bf16 weight copies (autocast)",
    "rollout_weights": "bf16 copy of the policy (rollouts)", "gathered_model": "whole weights for rollouts (FSDP)",
    "gathered_layers": "gathered root + layers (FSDP)", "kv_cache": "KV cache of one generate call",
    "sampling": "sampler logits + prefill", "forward_working": "forward without grad",
    "activations": "activations of a micro-batch", "lm_head_chunk": "LM-head chunk (--logit-chunk)",
}  # fmt: skip


def head_dim(c) -> int:
    return getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads


def layer_parameters(c) -> int:
    D, M, H, K, d = c.hidden_size, c.intermediate_size, c.num_attention_heads, c.num_key_value_heads, head_dim(c)
    return D * H * d + 2 * D * K * d + H * d * D + 3 * D * M + 2 * D + 2 * d  # attention, MLP, norms


def parameter_count(c) -> int:
    """Parameters of a Qwen3/Llama-style decoder from its config."""
    embeddings = c.vocab_size * c.hidden_size * (1 if getattr(c, "tie_word_embeddings", False) else 2)
    return c.num_hidden_layers * layer_parameters(c) + embeddings + c.hidden_size


def kv_bytes_per_token(c, bf16: bool) -> int:
    """KV-cache bytes per token of a sequence: K and V of every layer."""
    return 2 * c.num_hidden_layers * c.num_key_value_heads * head_dim(c) * (2 if bf16 else 4)


def sampler_bytes_per_sequence(c, prompt_tokens: int) -> int:
    """Generation's bytes per sequence besides its KV cache: the sampler's fp32 logits, probabilities and top-p
    sort, and the prefill's transients of one layer."""
    return 20 * c.vocab_size + prompt_tokens * (6 * c.intermediate_size + 14 * c.hidden_size)


def activation_bytes_per_token(c) -> int:
    """Bytes autograd keeps per token per decoder layer (fp32 weights, bf16 autocast, no checkpointing),
    measured with saved-tensor hooks at the real widths of Qwen3-1.7B and 8B (test_plan_matches_saved_tensors_
    at_real_width): 26 D, the fp32 input, normed input and mid-layer sum of both RMSNorms and autocast's bf16
    casts of the normed input per projection; 8 M, the MLP's gate, SiLU, up and product (bf16); 10 H d + 10 K d,
    q/k norms and SDPA's q, k, v and output; 8 H + 4 K + 8, RMSNorm reciprocals and SDPA's logsumexp. Flash and
    cuDNN attention save the same on CUDA; the math kernel (GPUs before sm80) would keep (T, T) scores."""
    D, M, H, K, d = c.hidden_size, c.intermediate_size, c.num_attention_heads, c.num_key_value_heads, head_dim(c)
    return 26 * D + 8 * M + 10 * H * d + 10 * K * d + 8 * H + 4 * K + 8


def plan_memory(model_config, cfg: Config, world_size: int = 1, device_bytes: float | None = None,
                device_type: str = "cuda") -> dict:  # fmt: skip
    """Bytes of each part and the peak of each phase (PHASES) on one rank, as a flat dict of numbers.
    Resolves the automatic settings against the device's memory (default: --gpu-memory-gb, else 80 GB):
    gradient checkpointing (on when the update would not fit without it) and the KV-cache budget (what
    generation leaves free, in as few generate calls as fit)."""
    c, W = model_config, world_size
    if getattr(c, "num_experts", None) or getattr(c, "num_local_experts", None):
        raise SystemExit(f"{cfg.model}: a mixture of experts ({c.model_type}); the memory plan covers dense decoders")
    device_bytes = device_bytes or (cfg.gpu_memory_gb or 80) * 1e9
    D, M, L, V = c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.vocab_size
    n = parameter_count(c)
    bf16 = uses_bf16(cfg, torch.device(device_type))
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
    # Generation: per sequence of a generate call, its KV cache and the sampler's memory. Gradients are freed by then.
    kv_per_seq = seq * kv_bytes_per_token(c, bf16)
    sampling_per_seq = sampler_bytes_per_sequence(c, cfg.max_prompt_tokens)
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


def device_memory(cfg: Config, device: torch.device) -> float:
    """Bytes the run may plan for: --gpu-memory-gb, else what is free on the GPU (the CUDA context, other
    processes and NCCL's buffers are not) plus what this process's allocator already holds, else the RAM."""
    if cfg.gpu_memory_gb > 0:
        return cfg.gpu_memory_gb * 1e9
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_reserved(device)
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def sequences_per_generate(model, prompt_len: int, cfg: Config, kv_cache_bytes: float | None = None) -> int:
    """How many sequences one generate call may hold: their KV cache fits kv_cache_bytes, else --kv-cache-gb,
    else what the memory plan leaves free on this device."""
    device = next(model.parameters()).device
    kv_cache_bytes = kv_cache_bytes or cfg.kv_cache_gb * 1e9 or plan_memory(
        model.config, cfg, rank_and_world()[1], device_memory(cfg, device), device.type)["kv_cache"]  # fmt: skip
    per_token = kv_bytes_per_token(model.config, uses_bf16(cfg, device))
    return max(1, int(kv_cache_bytes // (per_token * (prompt_len + cfg.max_new_tokens))))


def plan_summary(plan: dict) -> str:
    """The plan in one line, printed at the start of every run."""
    return (
        f"plan: peak {plan['peak'] / 1e9:.1f} GB of {plan['budget'] / 1e9:.1f} GB "
        f"({'fits' if plan['peak'] <= plan['budget'] else 'DOES NOT FIT'}) | gradient checkpointing "
        f"{'on' if plan['gradient_checkpointing'] else 'off'} | micro-batch {plan['micro_batch_tokens_planned']:,} "
        f"tokens, activations {plan['activations'] / 1e9:.1f} GB | {plan['generate_calls']} generate call(s) per "
        f"step of {plan['sequences_per_generate']} sequences, KV cache {plan['kv_cache'] / 1e9:.1f} GB"
    )


def plan_or_stop(model_config, cfg: Config, device: torch.device, world_size: int = 1) -> tuple[dict, Config]:
    """The memory plan in one line; stop now, before anything loads, if its peak exceeds the device. Returns the
    plan and cfg with its KV budget fixed now: once the weights are loaded, less memory is free."""
    device_bytes = device_memory(cfg, device)
    plan = plan_memory(model_config, cfg, world_size, device_bytes, device.type)
    allocator = os.environ.get("PYTORCH_ALLOC_CONF") or os.environ.get("PYTORCH_CUDA_ALLOC_CONF")
    where = f" | {device_bytes / 1e9:.1f} GB free on {device}, allocator {allocator}" if device.type == "cuda" else ""
    print(plan_summary(plan) + where)
    if plan["peak"] > plan["budget"]:
        sys.exit(f"the planned peak, {plan['peak'] / 1e9:.1f} GB, exceeds {plan['budget'] / 1e9:.1f} GB "
                 f"({HEADROOM:.0%} of {device_bytes / 1e9:.1f} GB on {device}); "
                 f"{fixes_that_fit(model_config, cfg, world_size, device_bytes, device.type)}; add --dry-run to see "
                 "the whole plan")  # fmt: skip
    return plan, dataclasses.replace(cfg, kv_cache_gb=cfg.kv_cache_gb or plan["kv_cache"] / 1e9)


def dry_run(cfg: Config):
    """The memory plan of --model from its config.json alone, as a table: no weights, no GPU needed."""
    device = torch.device("cuda") if torch.cuda.is_available() else None
    device_bytes = device_memory(cfg, device) if device else (cfg.gpu_memory_gb or 80) * 1e9
    c = load_model_config(cfg.model)
    plan = plan_memory(c, cfg, cfg.gpus, device_bytes)
    head = f"{'part (GB)':<34}" + "".join(f"{phase:>16}" for phase in PHASES)
    print(f"memory plan: {cfg.model} ({plan['parameters'] / 1e9:.2f} B parameters, {c.num_hidden_layers} layers, "
          f"hidden {c.hidden_size}), {cfg.gpus} GPU(s) of {device_bytes / 1e9:.0f} GB each, planned to "
          f"{HEADROOM:.0%} = {plan['budget'] / 1e9:.1f} GB\n{head}\n{'-' * len(head)}")  # fmt: skip
    for key, label in ((k, v) for k, v in PART_LABELS.items() if plan[k]):  # the parts this setting has
        print(f"{label:<34}" + "".join(f"{plan[key] / 1e9:16.1f}" if key in parts else f"{'-':>16}"
                                       for parts in PHASES.values()))  # fmt: skip
    print(f"{'peak':<34}" + "".join(f"{plan['peak_' + p.replace(' ', '_')] / 1e9:16.1f}" for p in PHASES))
    print(plan_summary(plan))
    if plan["peak"] > plan["budget"]:
        print(f"does not fit; {fixes_that_fit(c, cfg, cfg.gpus, device_bytes, 'cuda')}")


def fixes_that_fit(model_config, cfg: Config, world_size: int, device_bytes: float, device_type: str) -> str:
    """What brings the planned peak within the budget: the fewest GPUs (none added on a CPU), then the fewest
    kinds of change (checkpointing, a smaller micro-batch, an automatic KV budget, shorter answers), each
    combination with its peak; or why nothing does."""
    seq = cfg.max_prompt_tokens + cfg.max_new_tokens
    kinds = [k for k in (  # each kind's options, mildest first
        [{"gradient_checkpointing": "on"}] if cfg.gradient_checkpointing != "on" else [],
        [{"micro_batch_tokens": n * seq} for n in range(cfg.micro_batch_tokens // seq - 1, 0, -1)],
        [{"kv_cache_gb": 0}] if cfg.kv_cache_gb > 0 else [],
        [{"max_new_tokens": cfg.max_new_tokens // 2**k} for k in (1, 2, 3)],
    ) if k]  # fmt: skip
    gpu_counts = [world_size] + ([n for n in (2, 4, 8, 16, 32, 64) if n > world_size] if device_type == "cuda" else [])

    def tried(change: dict, gpus: int) -> tuple[bool, str]:  # (fits, the change described with its peak)
        plan = plan_memory(model_config, dataclasses.replace(cfg, **change), gpus, device_bytes, device_type)
        flags = [f"--{k.replace('_', '-')} {v}" for k, v in change.items()] + [f"{gpus} GPUs"] * (gpus > world_size)
        calls = plan["generate_calls"]  # many small generate calls decode slowly
        slow = f", {calls} generate calls of {plan['sequences_per_generate']}: slow" if calls >= 8 else ""
        text = f"{' + '.join(flags)} (peak {plan['peak'] / 1e9:.1f} GB{' each' if gpus > 1 else ''}{slow})"
        return plan["peak"] <= plan["budget"], text

    for gpus in gpu_counts:
        for size in range(len(kinds) + 1):
            found = []
            for combination in itertools.combinations(kinds, size):
                for options in itertools.product(*combination):
                    fits, text = tried({k: v for o in options for k, v in o.items()}, gpus)
                    if fits and (options or gpus > world_size):
                        found.append(text)
                        break
            if found:
                return "these fit: " + "; ".join(found)
    plan = plan_memory(model_config, dataclasses.replace(cfg, **{k: v for o in kinds for k, v in o[-1].items()}),
                       gpu_counts[-1], device_bytes, device_type)  # every change at its most  # fmt: skip
    peak, phase = max((plan[f"peak_{p.replace(' ', '_')}"], p) for p in PHASES)
    biggest = ", ".join(
        f"{PART_LABELS[k]} {plan[k] / 1e9:.1f} GB" for k in sorted(PHASES[phase], key=lambda k: -plan[k])[:3]
    )
    every = tried({k: v for o in kinds for k, v in o[-1].items()}, gpu_counts[-1])[1].split(" (")[0] or "every change"
    return f"nothing fits: even with {every}, the {phase} peak is {peak / 1e9:.1f} GB, mostly {biggest}"


# ----------------------------------------------------------------------------------------------
# F. Several GPUs: torchrun + FSDP2. Each rank holds whole groups of every mini-batch. What the paper
# takes over a mini-batch (the candidates' entropies behind tau_h, the kept-token count, the 20-Entropy
# threshold, GRPO's answer count) and what is logged is taken over every rank, and gradients are summed,
# so the update does not depend on the number of processes. In one process every function is the identity.


def rank_and_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def comm_device() -> torch.device:  # NCCL moves CUDA tensors, gloo CPU ones
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
    parts = [torch.empty(int(max(sizes)), dtype=t.dtype, device=device) for _ in range(world)]
    dist.all_gather(parts, F.pad(t.to(device), (0, int(max(sizes)) - t.numel())))  # all_gather wants equal sizes
    return torch.cat([part[: int(n)] for part, n in zip(parts, sizes, strict=True)]).to(t.device)


def all_records(records: list) -> list:
    """Python records of every rank, in rank order."""
    if not dist.is_initialized():
        return records
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, records)
    return [r for part in gathered for r in part]


def barrier():
    return dist.barrier() if dist.is_initialized() else None


def my_share(items: list, mini_batches: int) -> list:
    """This rank's items of a step: its slice of every mini-batch, so mini-batch k holds the same as in one process."""
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
    for module in [*model.model.layers, model]:
        fully_shard(module, mp_policy=precision or MixedPrecisionPolicy())
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

    whole = load_model(name, torch.device("cpu"), tokenizer, seed) if dist.get_rank() == 0 else None  # rank 0 only
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(load_model_config(name))
    shard_model(model, bf16).to_empty(device=device)
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(model, whole.state_dict() if whole is not None else {}, options=options)
    for key, buffer in model.named_buffers():  # not in a state dict: the rotary frequencies
        if whole is not None:
            buffer.copy_(whole.get_buffer(key))
        dist.broadcast(buffer, src=0)
    generation_config = [whole.generation_config if whole is not None else None]  # its EOS ids
    dist.broadcast_object_list(generation_config, src=0)
    model.generation_config = generation_config[0]
    return model


@contextmanager
def unsharded(model):
    """Whole weights on every rank for the rollouts: generate then runs no collective per token, so a rank
    whose answers end early never waits inside a forward for the others (generate(synced_gpus=True) would
    gather every layer for every token: 3x slower on CPU here)."""
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
    """Under FSDP2 (every rank calls it): the whole weights on rank 0 for save_pretrained, and each rank's
    optimizer shard written to folder/optimizer with torch.distributed.checkpoint."""
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


if __name__ == "__main__":
    main()
