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
20-Entropy, --mask none --loss-agg sequence --eps-high 0.2 is GRPO. "# STAPO:" marks every line
where STAPO differs from plain DAPO. Sections 1-4 read top to bottom; the appendix is what a run
needs besides. Left out on purpose: vLLM (HF generate is slower but readable), sequence packing,
multi-node scripts, length penalties, KL. Tools beside it: eval.py, plan.py, bench.py, plot.py.

Run:   python stapo.py --model Qwen/Qwen3-1.7B-Base                      (one GPU)
       python stapo.py --model tiny --steps 3                            (CPU smoke run, no downloads)
       python stapo.py --model tiny-sft --steps 120 --lr 1e-3            (CPU demo: tokens silenced)
       torchrun --nproc_per_node 8 stapo.py --model Qwen/Qwen3-8B-Base   (8 GPUs, one node)
"""

import argparse
import dataclasses
import datetime
import functools
import importlib
import json
import math
import os
import random
import re
import shutil
import signal
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, NamedTuple

if __name__ == "__main__":  # a Ctrl-C while torch loads (seconds): one line, not a traceback from inside torch
    signal.signal(signal.SIGINT, lambda *_: print("stopped before the run began", file=sys.stderr) or os._exit(130))

import huggingface_hub as hub
import huggingface_hub.errors
import tokenizers
import torch
import torch.distributed as dist
import torch.nn.functional as F
import transformers
from torch.distributed import fsdp
from torch.distributed.checkpoint import state_dict as dcp
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
    model: str = knob("Qwen/Qwen3-1.7B-Base", "HF id or folder; tiny: random, toy data; tiny-sft: the CPU demo")
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
    generate_batch: int = knob(0, "sequences per generate call; 0: as many as the free memory holds")
    # STAPO / S2T
    mask: Literal["s2t", "none", "high-entropy"] = knob("s2t", "STAPO (s2t), JustRL/GRPO (none), 20-Entropy")
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
    gradient_checkpointing: Literal["auto", "on", "off"] = knob("auto", "recompute in backward; auto: if needed")
    gpu_memory_gb: float = knob(0.0, "memory to plan for; 0: what is free on the device")
    # logging and checkpoints
    save_every: int = knob(50, "checkpoint every N steps (and at the end)")
    report_to: Literal["none", "wandb", "trackio"] = knob("none", "also send the metrics to a tracker")
    log_samples: int = knob(4, "completions written to samples.jsonl per step")


TINY = ("tiny", "tiny-sft")  # random; then taught the answer format (teach_format): the CPU demo
TINY_DEFAULTS = {"dataset": "toy", "prompts_per_step": 8, "max_new_tokens": 64}  # seconds per step on a CPU


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
    # STAPO: candidates are the unlikely tokens of correct answers (p < tau_p strictly, compared as log p)
    candidates = (advantages[:, None] > 0) & completion_mask & (logp < math.log(tau_p))  # (B, T)
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
    G, clock = cfg.group_size, {}
    with timed("generation", clock):  # 1. rollouts: every problem G times; 2. rewards; 3. advantages
        examples = pick_problems(problems, step, cfg)  # this step's problems (under torchrun, this rank's share)
        prompts = [e["prompt_ids"] for e in examples for _ in range(G)]  # B prompts
        rollouts = generate(model, tokenizer, prompts, cfg, f"step {step + 1} rollouts")
        B, completions = len(prompts), zip(rollouts.completions, rollouts.completion_mask, strict=True)
        texts = [tokenizer.decode(c[m], skip_special_tokens=True) for c, m in completions]
        golds = [e["answer"] for e in examples for _ in range(G)]
        rewards = torch.tensor([float(verify(t, g)) for t, g in zip(texts, golds, strict=True)])  # (B,)
        advantages = group_advantages(rewards, G)  # (B,)
    with timed("scoring", clock):  # 4. p and H under the rollout policy, for the S2T mask
        old_logp, entropy = score(model, rollouts, list(range(B)), cfg)  # (B, T) each
    with timed("update", clock):  # 5. the mask and the clipped updates, mini-batch by mini-batch
        stats, silenced = ppo_update(model, optimizer, rollouts, old_logp, entropy, advantages, cfg)

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
        "grad_norm": sum(stats["grad_norm"]) / len(stats["grad_norm"]), "lr": optimizer.param_groups[0]["lr"],
    } | clock  # fmt: skip
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
            if k == 0:
                stop_point()  # no optimizer step yet: a stop can drop this step whole
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
    pad = functools.partial(torch.nn.utils.rnn.pad_sequence, batch_first=True, padding_side="left")
    return pad(seqs, padding_value=pad_id), pad([torch.ones_like(s) for s in seqs])


def sequence_logp(model, rollouts: Rollouts, rows: list[int], cfg: Config, with_entropy: bool = False):
    """logp (b, T) of the sampled tokens of `rows` (and entropy), T their longest completion. The layout, [left pad |
    prompt | completion | right pad], and position ids that count real tokens are generate()'s, so logp equal its."""
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
    """Rows in micro-batches whose size as sequence_logp pads them, rows x (longest prompt + longest completion),
    fits token_budget; sorted by length first, to pad little. Under torchrun every rank runs as many (lock_step)."""
    prompt, completion = [len(p) for p in rollouts.prompts], rollouts.completion_mask.sum(1).tolist()
    batches, current = [], []
    for r in sorted(rows, key=lambda r: prompt[r] + completion[r]):
        width = max(prompt[i] for i in [*current, r]) + max(completion[i] for i in [*current, r])
        if current and (len(current) + 1) * width > token_budget:
            batches.append(current)
            current = []
        current.append(r)
    return lock_step(batches + ([current] if current else []))


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
    name, flag = cfg.resume or cfg.model, "--resume" if cfg.resume else "--model"
    with loading(flag, name):
        model_config, tokenizer = load_model_config(name), load_tokenizer(name)
    cfg, plan = fit_memory(model_config, cfg, device, world)  # before anything big loads
    same_run = check_run_folder(cfg)  # before anything slow, and before anything is written
    torch.manual_seed(cfg.seed + rank)  # every rank samples its own answers
    random.seed(cfg.seed + rank)
    with loading("--dataset", cfg.dataset, "dataset"):
        problems = load_problems(cfg, tokenizer)
    with loading(flag, name):  # under torchrun, sharded as it loads: only rank 0 reads the whole model
        load = load_model if world == 1 else functools.partial(load_sharded_model, bf16=uses_bf16(cfg, device))
        model = load(name, device, tokenizer, cfg.seed)
    if cfg.gradient_checkpointing == "on":
        enable_checkpointing(model)
    model.train()
    optimizer, scheduler = build_optimizer(model, cfg)
    start, last = restore(cfg, model, optimizer, scheduler) if cfg.resume else 0, cfg.resume
    out = open_run_folder(cfg, same_run) if rank == 0 else Path(cfg.output_dir)
    tracker = importlib.import_module(cfg.report_to) if cfg.report_to != "none" and rank == 0 else None
    if tracker:  # wandb and trackio share one API
        tracker.init(project="stapo", name=out.resolve().name, config=dataclasses.asdict(cfg))

    def request_stop(signum, frame):  # Ctrl-C or SIGTERM: once, stop soon and save; twice, at once
        if STOP:
            raise KeyboardInterrupt
        STOP.append(signum)
        print("stopping soon to save the last completed step (Ctrl-C again to quit now)", flush=True)

    STOP.clear()
    previous = {s: signal.signal(s, request_stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        for step in range(start, cfg.steps):
            rng = rng_states()  # as the last completed step left them
            try:
                metrics, records = train_step(model, tokenizer, optimizer, problems, step, cfg)
            except StopRun:  # nothing of this step was applied: save the one before, unless it is saved
                if step > max(start, checkpoint_step(last or "")):
                    last = save_checkpoint(model, tokenizer, optimizer, scheduler, cfg, step, rng)
                break
            scheduler.step()
            records = {name: all_records(r) for name, r in records.items()}  # every rank's, in rank order
            if rank == 0:  # one writer of the log files
                tqdm.write(log_line(metrics))
                for name, rows in (("metrics", [metrics]), *records.items()):
                    append_jsonl(out / f"{name}.jsonl", rows)
                if tracker:
                    tracker.log({k: v for k, v in metrics.items() if isinstance(v, int | float)}, step=step + 1)
            if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps:
                last = save_checkpoint(model, tokenizer, optimizer, scheduler, cfg, step + 1, rng_states())
                print(f"saved {last}")
    except torch.OutOfMemoryError as e:  # one line: the phase, what the plan gave it, what to try
        phase = (getattr(e, "__notes__", None) or ["update"])[-1]
        if phase == "generation":
            what = (f"{cfg.generate_batch} sequences per generate call (planned at {plan['generation'] / 1e9:.1f} "
                    f"GB); try --generate-batch {max(1, cfg.generate_batch // 2)}")  # fmt: skip
        else:  # scoring and the update run micro-batches
            what = (f"micro-batches of {cfg.micro_batch_tokens:,} tokens, checkpointing {cfg.gradient_checkpointing}; "
                    f"try --micro-batch-tokens {cfg.micro_batch_tokens // 2}")  # fmt: skip
        sys.exit(f"out of memory in {phase}: {what}. The last checkpoint, {last or 'none yet'}, is intact; "
                 "python plan.py with the same flags prints the plan of every phase")  # fmt: skip
    finally:
        if tracker:
            tracker.finish()
        for s, handler in previous.items():
            signal.signal(s, handler)
    if STOP:
        launcher = f"torchrun --nproc_per_node {world}" if world > 1 else "python"
        print(f"stopped; resume with: {launcher} stapo.py --resume {last}" if last else "stopped before any step")
    return model


def log_line(m: dict) -> str:
    tau_h = f"{m['tau_h']:.3f}" if m["tau_h"] is not None else "  -  "
    peak = f" | peak {max(m[k] for k in m if k.endswith('_gb')):.1f} GB" if "update_gb" in m else ""
    return (
        f"step {m['step']:>4}/{m['steps']} | reward {m['reward']:.3f} | zero-std {m['frac_zero_std']:.2f} | "
        f"len {m['len_mean']:6.1f} | trunc {m['truncated_frac']:.2f} | H {m['entropy']:.3f} | "
        f"silenced {m['n_spurious']:>3}/{m['n_candidates']:<4} ({100 * m['spurious_frac']:.4f}%) tau_h {tau_h} | "
        f"clip {100 * m['clip_frac']:.2f}% | loss {m['loss']:+.4f} | gnorm {m['grad_norm']:.3f} | "
        f"lr {m['lr']:.1e} | gen {m['generation_s']:.1f}s score {m['scoring_s']:.1f}s update {m['update_s']:.1f}s{peak}"
    )


def main(argv=None):
    cfg = parse_args(argv)
    transformers.utils.logging.disable_progress_bar()  # ours show the rollouts

    def quit_now(*_):  # a Ctrl-C outside the loop, or a second one in it: at once, without a traceback
        last = latest_checkpoint(Path(cfg.output_dir))
        print(f"stopped at once; the last complete checkpoint is {last or 'none'}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(130)  # not a KeyboardInterrupt: a __del__ running at that moment would swallow it

    previous = signal.signal(signal.SIGINT, quit_now)
    try:
        train(cfg)
    except KeyboardInterrupt:  # in the loop, raised so that a checkpoint half written is removed first
        quit_now()
    finally:
        signal.signal(signal.SIGINT, previous)
        if dist.is_initialized():
            dist.destroy_process_group()


# ==============================================================================================
# Appendix: what a run needs besides.
# ----------------------------------------------------------------------------------------------
# A. Reward: the rule-based verifier the paper trains with (DAPO's). The answer is the last \boxed{}; both
# sides are normalised, then compared as strings, then as numbers. eval.py grades benchmarks with more
# structure (tuples, intervals, sets, equations) and an LLM judge.

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


NORMALIZE = [  # (pattern, replacement), in this order, on both answers
    (r",\\!\s*|\{,\}", ","),  # 1,\!000 and 1{,}000: a thousands comma, before \! goes
    (r"\\(?:text|textnormal|textrm|textbf|mathrm|mathbf|mbox)\s*\{([^{}]*)\}", r"\1"),  # \text{ cm} -> cm
    (r"\\[dtc]frac", r"\\frac"),
    (r"\^\s*\{?\\circ\}?|\\circ|°|\\%|%|\\\$|\$", ""),  # degrees, percent, dollars
    (r"\\(?:left|right)(?![a-zA-Z])|\\[!,;: ]|\\q?quad|\\displaystyle", ""),  # sizes and spaces
    (r"(?<=\d)\s+[a-zA-Z]+(?:\^\{?\d\}?)?(?:\s+[a-zA-Z]+)*\.?\s*$", ""),  # units after a number: 5 cm^2
    (r"^\s*\\?[a-zA-Z]\w*\s*=", ""),  # a leading x = or \theta =
]
THOUSANDS = re.compile(r"[+-]?[1-9]\d{0,2}(?:,\d{3})+(?:\.\d+)?")  # 1,234,567; "32, 349" is a list
FRAC = re.compile(r"\\frac(\d|\{[^{}]*\})(\d|\{[^{}]*\})")  # \frac12, \frac{1}2, \frac1{2}, \frac{1}{2}


def normalize(answer: str) -> str:
    s = answer.strip()
    for pattern, replacement in NORMALIZE:
        s = re.sub(pattern, replacement, s)
        s = s.replace(",", "") if THOUSANDS.fullmatch(s.strip()) else s  # while spaces still tell lists apart
    s = re.sub(r"\s+", "", s).rstrip(".")
    return FRAC.sub(lambda m: f"\\frac{{{m[1].strip('{}')}}}{{{m[2].strip('{}')}}}", s)


def to_number(s: str) -> float | None:
    """A finite number from a normalised answer: 12, -0.5, 4.5e33, 4.5\\times10^{33}, 10^5, 3/4, \\frac{3}{4}."""
    s = re.sub(r"^(?:([+-]?[\d.]+)\\(?:times|cdot))?10\^\{?([+-]?\d+)\}?$", lambda m: f"{m[1] or 1}e{m[2]}", s)
    m = re.fullmatch(r"([+-]?)\\frac\{([^{}]+)\}\{([^{}]+)\}", s) or re.fullmatch(r"([+-]?)([^/]+)/([^/]+)", s)
    try:
        value = (-1 if m[1] == "-" else 1) * float(m[2]) / float(m[3]) if m else float(s)
    except (ValueError, ZeroDivisionError):
        return None
    return value if math.isfinite(value) else None


def verify(completion: str, gold) -> bool:
    """Reward: the last \\boxed{} of the completion equals the gold, as normalised strings or as numbers (integers
    exactly, else within a relative 1e-4); an empty answer or gold earns nothing. Never raises, never evaluates."""
    boxed = extract_boxed(completion) or ""
    pred, target = normalize(boxed) if len(boxed) <= MAX_ANSWER_CHARS else "", normalize(str(gold))
    if not pred or not target or pred == target:
        return bool(pred) and pred == target
    x, y = to_number(pred), to_number(target)
    if x is None or y is None:
        return False
    if re.fullmatch(r"[+-]?\d+", pred) and re.fullmatch(r"[+-]?\d+", target):
        return int(pred) == int(target)  # integers: exact, whatever their size
    return math.isclose(x, y, rel_tol=1e-4)  # relative only: 0 is not 4.6e-24


# ----------------------------------------------------------------------------------------------
# B. Data and prompt

INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
# The wrapper DAPO-Math-17k puts around every problem on the Hub; we use the paper's instruction.
DAPO_PREFIX = (
    "Solve the following math problem step by step. The last line of your response should be of the "
    "form Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n"
)
DAPO_SUFFIX = '\n\nRemember to put your answer on its own line after "Answer:".'
PROBLEM_KEYS, ANSWER_KEYS = ("problem", "question", "prompt"), ("answer", "ground_truth", "solution")


def toy_problems() -> list[dict]:
    """A dataset for CPU runs that needs no files: a digit written 40 times, and the answer is the digit.
    Two problems, so that a 2-layer model learns them with RL in a minute (with ten it learns nothing)."""
    return [{"problem": d * 40, "answer": d} for d in "01"]


def parse_row(row: dict, problem_key: str | None = None, answer_key: str | None = None) -> dict | str:
    """One training row -> {"problem", "answer"}, or why it is unusable. Recognised: problem/question/prompt (a
    string, or DAPO's chat list), DAPO's reward_model.ground_truth, answer/ground_truth/solution (a bare gold)."""
    problem = next((row[k] for k in ([problem_key] if problem_key else PROBLEM_KEYS) if k in row), None)
    if isinstance(problem, list):  # chat messages: the last user turn
        turns = [m.get("content") for m in problem if isinstance(m, dict) and m.get("role", "user") == "user"]
        problem = turns[-1] if turns else None
    dapo = row["reward_model"].get("ground_truth") if isinstance(row.get("reward_model"), dict) else None
    keys = [answer_key] if answer_key else ANSWER_KEYS
    answer = next((row[k] for k in keys if row.get(k) not in (None, "")), None if answer_key else dapo)
    answer = int(answer) if isinstance(answer, float) and answer.is_integer() else answer  # 27.0 -> "27"
    if not isinstance(problem, str) or not problem.strip():
        return "no problem text (or a chat without a user turn)"
    if isinstance(answer, bool) or not isinstance(answer, str | int | float) or not str(answer).strip():
        kind = "empty" if answer is None or isinstance(answer, str) else f"a {type(answer).__name__}"
        return f"the gold answer is {kind}"
    problem = problem.strip().removeprefix(DAPO_PREFIX.strip()).removesuffix(DAPO_SUFFIX.strip()).strip()
    return {"problem": problem, "answer": str(answer).strip()}


def load_problems(cfg: Config, tokenizer) -> list[dict]:
    """Problems with gold answers, unique by text, whose prompt fits --max-prompt-tokens, with their token ids:
    toy, a local .jsonl (read here: an error names its line), .json or .parquet file, or a Hub dataset."""
    path, kind = Path(cfg.dataset), {".json": "json", ".parquet": "parquet"}.get(Path(cfg.dataset).suffix)
    if path.is_file() and not kind and path.suffix != ".jsonl":
        raise ValueError("local files are .jsonl, .json or .parquet")
    if cfg.dataset == "toy" or path.suffix == ".jsonl":
        rows = toy_problems() if cfg.dataset == "toy" else read_jsonl(path, torn_tail_ok=False)
    else:
        import datasets

        datasets.disable_progress_bars()
        rows = list(datasets.load_dataset(kind, data_files=str(path), split="train") if kind else
                    datasets.load_dataset(cfg.dataset, cfg.dataset_config, split=cfg.split))  # fmt: skip
    parsed = [parse_row(row, cfg.problem_key, cfg.answer_key) for row in rows]
    skipped = [f"row {n}: {why}" for n, why in enumerate(parsed, 1) if isinstance(why, str)]
    unique = {e["problem"]: e for e in parsed if isinstance(e, dict)}  # the Hub's DAPO repeats each ~100 times
    if not unique:
        columns = sorted(rows[0]) if rows else []
        raise ValueError(
            f"no usable row ({skipped[0] if skipped else 'empty'}); its columns are {columns}: name "
            "them with --problem-key and --answer-key"
        )
    problems = [{**e, "prompt_ids": encode_prompt(e["problem"], tokenizer, cfg.prompt_format)} for e in unique.values()]
    fitting = [p for p in problems if len(p["prompt_ids"]) <= cfg.max_prompt_tokens]
    print(f"data: {len(fitting)} problems from {cfg.dataset}; skipped: {len(skipped)} unusable rows"
          f"{f' (first: {skipped[0]})' if skipped else ''}, {len(problems) - len(fitting)} longer prompts")  # fmt: skip
    if not fitting:
        shortest = min(len(p["prompt_ids"]) for p in problems)
        sys.exit(f"--max-prompt-tokens {cfg.max_prompt_tokens}: no prompt fits (the shortest has {shortest} tokens)")
    return fitting


def build_prompt(problem: str, tokenizer, prompt_format: str = "chat") -> str:
    """The problem plus the paper's instruction, in the tokenizer's chat template or as plain text."""
    content = f"{problem}\n\n{INSTRUCTION}"
    if prompt_format == "plain":
        return content + "\n\n"
    return tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                         add_generation_prompt=True)  # fmt: skip


def encode_prompt(problem: str, tokenizer, prompt_format: str = "chat") -> torch.Tensor:
    """Token ids of build_prompt's text; the template already holds any special tokens."""
    return torch.tensor(tokenizer(build_prompt(problem, tokenizer, prompt_format), add_special_tokens=False).input_ids)


def pick_problems(problems: list, step: int, cfg: Config) -> list:
    """The P problems of a step, a fresh seeded permutation each epoch (a resumed run needs only the step number);
    under torchrun, this rank's slice of every mini-batch."""
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
def generate(model, tokenizer, prompts: list[torch.Tensor], cfg: Config, desc: str = "rollouts") -> Rollouts:
    """One sampled completion per prompt, --generate-batch sequences per generate call (0: all in one)."""
    device, eos = next(model.parameters()).device, eos_token_ids(model, tokenizer)
    gen_config = transformers.GenerationConfig(do_sample=True, temperature=cfg.temperature, top_p=cfg.top_p, top_k=0,
                                  max_new_tokens=cfg.max_new_tokens, eos_token_id=eos,
                                  pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    per_call, completions, was_training = cfg.generate_batch or len(prompts), [], model.training
    progress = DecodeProgress(f"{desc} ({len(prompts)} sequences)", -(-len(prompts) // per_call), cfg.max_new_tokens)
    with progress, sampling_weights(model.eval(), uses_bf16(cfg, device)) as sampler:
        for start in range(0, len(prompts), per_call):
            stop_point()  # nothing of this step was applied yet: a stop can drop it whole
            ids, mask = left_pad(prompts[start : start + per_call], tokenizer.pad_token_id)
            out = sampler.generate(input_ids=ids.to(device), attention_mask=mask.to(device), streamer=progress,
                                   generation_config=gen_config, synced_gpus=False)  # (b, L + new)  # fmt: skip
            completions += list(out[:, ids.shape[1] :].cpu())
    model.train(was_training)
    # Cut each completion after its first EOS, which stays in (it is the answer's last action).
    tokens = torch.nn.utils.rnn.pad_sequence(completions, batch_first=True, padding_value=-1)  # (B, T)
    eos_hit = torch.isin(tokens, torch.tensor(eos)).long()  # (B, T)
    completion_mask = (eos_hit.cumsum(1) - eos_hit == 0) & (tokens >= 0)  # (B, T): up to the first EOS, included
    truncated = eos_hit.sum(1) == 0  # (B,): no EOS within max_new_tokens
    return Rollouts(prompts, tokens.where(completion_mask, tokenizer.pad_token_id), completion_mask, truncated)


@contextmanager
def sampling_weights(model, bf16: bool):
    """The policy generate samples from. Under FSDP2 the whole weights gathered on every rank (bf16 with bf16
    compute): generate then runs no collective per token, so no rank waits inside a forward for another. In one
    process with bf16, the model with bf16 copies of its fp32 master weights in their place, not autocast (Qwen3's
    fp32 q/k-norm weights would make its keys fp32); the master weights are put back after sampling."""
    if groups := [m for m in model.modules() if isinstance(m, fsdp.FSDPModule)]:
        model.set_reshard_after_forward(False)
        for group in groups:
            group.unshard()
        try:
            yield model
        finally:
            for group in groups:
                group.reshard()
            model.set_reshard_after_forward(True)
            model.set_reshard_after_forward(False, recurse=False)  # FSDP2's default for the root
    elif bf16 and next(model.parameters()).dtype != torch.bfloat16:
        master = {p: p.data for p in model.parameters()}  # a tied weight is one parameter: one copy
        try:
            for p in master:
                p.data = p.data.to(torch.bfloat16)  # freed when sampling ends: its memory serves the update
            yield model
        finally:
            for p, data in master.items():
                p.data = data
    else:
        yield model


class DecodeProgress(tqdm):
    """generate()'s streamer: decoding steps as a bar in a terminal, in a log a status every 30 s of long work."""

    def __init__(self, desc: str, calls: int, max_new_tokens: int, every: float = 30.0):
        every, self.per_call = 0.1 if sys.stderr.isatty() else every, max_new_tokens
        super().__init__(total=calls * max_new_tokens, desc=desc, unit="tok", leave=False, mininterval=every,
                         delay=every, disable=rank_and_world()[0] > 0)  # fmt: skip

    def put(self, ids):  # the prompt (2-D), then each decoding step's tokens (1-D)
        self.update(ids.dim() == 1)

    def end(self):  # a call ends, early when every answer has stopped: count it whole
        self.update(-self.n % self.per_call)


def eos_token_ids(model, tokenizer) -> list[int]:
    """Every id that ends an answer: Qwen3-Base stops on <|endoftext|>, chat turns end on <|im_end|>."""
    configured, im_end = model.generation_config.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")
    ids = {tokenizer.eos_token_id, im_end, *(configured if isinstance(configured, list) else [configured])}
    return sorted(i for i in ids if isinstance(i, int) and i != tokenizer.unk_token_id)


def build_tiny_tokenizer():
    """Byte-level tokenizer (256 bytes + Qwen's three special tokens): any text, no download."""
    alphabet = tokenizers.pre_tokenizers.ByteLevel.alphabet()
    tok = tokenizers.Tokenizer(tokenizers.models.BPE({c: i for i, c in enumerate(sorted(alphabet))}, []))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    tok.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )
    tokenizer.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    return tokenizer


def tiny_config():
    """A 2-layer Qwen3 shaped like the real one (GQA, tied embeddings), for the tiny tokenizer:
    256 bytes, then <|endoftext|> (256, also pad), <|im_start|>, <|im_end|> (258)."""
    return transformers.Qwen3Config(vocab_size=259, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                    head_dim=16, num_attention_heads=4, num_key_value_heads=2, pad_token_id=256,
                                    max_position_embeddings=2048, tie_word_embeddings=True, eos_token_id=[256, 258],
                                    bos_token_id=None)  # fmt: skip


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
    return tiny_config() if name in TINY else transformers.AutoConfig.from_pretrained(name)


def load_tokenizer(name: str):
    tokenizer = build_tiny_tokenizer() if name in TINY else transformers.AutoTokenizer.from_pretrained(name)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    return tokenizer


def load_model(name: str, device: torch.device, tokenizer, seed: int = 0, dtype=torch.float32):
    """The policy, in fp32 to train whatever its config says: at lr 1e-6, bf16 weights drop the update."""
    if name not in TINY:
        return transformers.AutoModelForCausalLM.from_pretrained(name, dtype=dtype, use_safetensors=True).to(device)
    torch.manual_seed(seed)
    model = transformers.Qwen3ForCausalLM(tiny_config())
    return (teach_format(model, tokenizer) if name == "tiny-sft" else model).to(device, dtype)


def enable_checkpointing(model):  # transformers before 5.23 has the old name only
    (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()


def load_policy(name: str, device: torch.device, seed: int = 0, dtype=torch.float32):
    """(model, tokenizer); the model in fp32 unless dtype says otherwise."""
    with loading("--model", name):
        tokenizer = load_tokenizer(name)
        return load_model(name, device, tokenizer, seed, dtype), tokenizer


@contextmanager
def loading(flag: str, name: str, kind: str = "model"):
    """What fails inside is one line naming the flag, not a traceback. A name that is no local path is a Hub id,
    asked for once (seconds, no retries); if the Hub cannot be reached, only the local Hugging Face cache is tried."""
    local, why_not, cache = name in (*TINY, "toy") or Path(name).exists(), None, False
    if not local and hub.constants.HF_HUB_OFFLINE:
        why_not, cache = "HF_HUB_OFFLINE is set", True
    elif not local:
        try:
            getattr(hub.HfApi(), f"{kind}_info")(name, timeout=10)
        except hub.errors.HFValidationError:
            why_not = "it is not a Hub id either"
        except hub.errors.RepositoryNotFoundError:
            why_not = f"the Hugging Face Hub has no {kind} of that name"
        except Exception as e:  # no network, a proxy, a time-out: from here on the cache only, no more requests
            why_not, cache = f"the Hugging Face Hub cannot be reached ({type(e).__name__})", True
            os.environ["HF_HUB_OFFLINE"], hub.constants.HF_HUB_OFFLINE = "1", True
    try:
        if why_not and not cache:
            raise FileNotFoundError(why_not)
        yield
    except Exception as e:  # a damaged file (json, safetensors, parquet, ...), or a name found nowhere
        why = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}" if str(e) else type(e).__name__
        if why_not:
            why = f"no local file or folder of that name here, and {why_not}" + "; nor is it in the local cache" * cache
        elif latest := latest_checkpoint(Path(name)):
            why = f"a run folder: pass one of its checkpoints, e.g. {latest}"
        elif kind == "model" and Path(name).is_dir() and not (Path(name) / "config.json").exists():
            why = "a folder without a config.json, so no model folder (hf download ID --local-dir FOLDER makes one)"
        sys.exit(f"{flag} {name}: {why}")


def resolve_device(cfg: Config) -> torch.device:
    return torch.device(("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device)


# ----------------------------------------------------------------------------------------------
# D. Run folder, checkpoints, log files, stopping, command line

LOG_FILES = ("metrics.jsonl", "samples.jsonl", "spurious.jsonl")


def checkpoint_step(path) -> int:
    """N of a checkpoint folder step-N (one with a trainer_state.pt), else -1."""
    match = re.fullmatch(r"step-(\d+)", Path(path).name)
    return int(match[1]) if match and (Path(path) / "trainer_state.pt").exists() else -1


def latest_checkpoint(run: Path) -> Path | None:
    return max((p for p in run.glob("step-*") if checkpoint_step(p) >= 0), key=checkpoint_step, default=None)


def check_run_folder(cfg: Config) -> bool:
    """One run, one folder: --resume continues in the checkpoint's own folder from its latest checkpoint only, or
    branches into a new --output-dir; a new run needs a folder without one. True if this run continues."""
    out, latest = Path(cfg.output_dir), latest_checkpoint(Path(cfg.output_dir))
    if cfg.resume and out.resolve() == Path(cfg.resume).parent.resolve():
        if latest.resolve() != Path(cfg.resume).resolve():
            sys.exit(f"--resume {cfg.resume}: {out} has a later checkpoint, {latest.name}; continuing here would mix "
                     "two histories. Branch into a new folder: --output-dir NEW_FOLDER")  # fmt: skip
        return True
    if latest or any((out / n).exists() for n in (*LOG_FILES, "stapo_config.json")):
        sys.exit(f"--output-dir {out} already holds a run" + (f"; continue it with --resume {latest}" if latest else
                 " that stopped before its first checkpoint (nothing to resume)") + ", or give a new one")  # fmt: skip
    return False


def open_run_folder(cfg: Config, same_run: bool) -> Path:
    """The run folder and its stapo_config.json. Continuing, the records a stop left after the checkpoint (and a
    line cut short) move to <name>.after-step-N.jsonl: log files only grow, nothing is deleted."""
    out, step = Path(cfg.output_dir), checkpoint_step(cfg.resume or "")
    out.mkdir(parents=True, exist_ok=True)
    for path in (out / name for name in LOG_FILES if same_run and (out / name).exists()):
        data, records = path.read_bytes(), read_jsonl(path)
        kept = [r for r in records if r["step"] <= step]
        if len(kept) < len(records) or data and not data.endswith(b"\n"):
            append_jsonl(path.with_suffix(f".after-step-{step:06d}.jsonl"), records[len(kept) :])
            replace_file(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept))
    branch = {"branched_from": str(Path(cfg.resume).resolve())} if cfg.resume and not same_run else {}
    replace_file(out / "stapo_config.json", json.dumps(dataclasses.asdict(cfg) | branch, indent=2))
    print(f"config: {out / 'stapo_config.json'}")
    return out


def rng_states() -> dict:
    cuda = {"cuda": torch.cuda.get_rng_state_all()} if torch.cuda.is_available() else {}
    return {"torch": torch.get_rng_state(), "python": random.getstate()} | cuda


def save_checkpoint(model, tokenizer, optimizer, scheduler, cfg: Config, step: int, rng: dict) -> Path:
    """out/step-N, whole or not at all: a temporary folder, then one rename; a failed write stops with one line
    naming the last good checkpoint. Under torchrun every rank calls it: torch's state-dict helpers gather the
    whole weights and optimizer state on rank 0, which writes the same files one process writes."""
    out, (rank, world) = Path(cfg.output_dir), rank_and_world()
    whole = dcp.StateDictOptions(full_state_dict=True, cpu_offload=True)
    final, tmp = out / f"step-{step:06d}", out / f".tmp-step-{step:06d}"
    weights = dcp.get_model_state_dict(model, options=whole)
    optim, rngs = dcp.get_optimizer_state_dict(model, optimizer, options=whole), all_records([rng])
    try:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            if getattr(model.config, "tie_word_embeddings", False):
                weights.pop("lm_head.weight", None)  # the same tensor as the embeddings
            model.save_pretrained(tmp, state_dict=weights)  # safetensors
            tokenizer.save_pretrained(tmp)
            torch.save(optim, tmp / "optimizer.pt")
            torch.save({"step": step, "scheduler": scheduler.state_dict(), "rng": rngs}, tmp / "trainer_state.pt")
            (tmp / "stapo_config.json").write_text(json.dumps(dataclasses.asdict(cfg) | {"world_size": world}))
            os.replace(tmp, final)
    except (OSError, RuntimeError) as e:  # a full disk, say (torch reports it as a RuntimeError)
        sys.exit(f"could not save {final} ({type(e).__name__}: {str(e).splitlines()[0][:120]}); the last good "
                 f"checkpoint is {latest_checkpoint(out) or 'none yet'}")  # fmt: skip
    finally:  # a failed or interrupted write leaves no temporary folder behind
        if rank == 0:  # the writer's alone: another rank would remove it under the writer's feet
            shutil.rmtree(tmp, ignore_errors=True)
    all_records([])  # every rank waits for the write
    return final


def restore(cfg: Config, model, optimizer, scheduler) -> int:
    """Optimizer, schedule and RNG of the checkpoint, then this run's --lr, --weight-decay and --warmup-steps.
    Returns the step to continue from."""
    path, (rank, world) = Path(cfg.resume), rank_and_world()
    try:  # weights_only: tensors and numbers, nothing executed (never weights_only=False, as torch suggests)
        state = torch.load(path / "trainer_state.pt", weights_only=True)
        optim = torch.load(path / "optimizer.pt", weights_only=True, mmap=True) if rank == 0 else {}
        whole = dcp.StateDictOptions(full_state_dict=True, broadcast_from_rank0=True) if world > 1 else None
        dcp.set_optimizer_state_dict(model, optimizer, optim, options=whole)  # each rank takes its shards
        scheduler.load_state_dict(state["scheduler"])
        rng = state["rng"][rank]
    except Exception as e:
        sys.exit(f"--resume {path}: not a readable trainer state ({type(e).__name__}); resume from another checkpoint")
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    scheduler.base_lrs = [cfg.lr for _ in optimizer.param_groups]
    for group in optimizer.param_groups:
        group.update(initial_lr=cfg.lr, lr=cfg.lr * scheduler.lr_lambdas[0](scheduler.last_epoch),
                     weight_decay=cfg.weight_decay)  # fmt: skip
    print(f"resumed from {path} at step {state['step']}")
    return state["step"]


def read_jsonl(path: Path, torn_tail_ok: bool = True) -> list[dict]:
    """One JSON object per UTF-8 line; anything else is one line naming file and line, except a last line that a
    kill during an append cut short (no newline), dropped with a warning if torn_tail_ok."""
    lines, records = path.read_bytes().split(b"\n"), []  # the last item is b"" when the file ends with a newline
    for n, line in enumerate(lines, 1):
        try:
            record = json.loads(line.decode()) if line.strip() else {}
        except ValueError as e:  # not UTF-8, or not JSON
            record = e
        if not isinstance(record, dict) and torn_tail_ok and n == len(lines):
            print(f"warning: {path}: line {n} is cut short (a crash while writing?); dropped", file=sys.stderr)
        elif not isinstance(record, dict):
            why = record if isinstance(record, ValueError) else f"a JSON {type(record).__name__}"
            sys.exit(f"{path}: line {n}: not a JSON object ({why})")
        elif line.strip():
            records.append(record)
    return records


def replace_file(path: Path, text: str):
    """Replace a file whole or not at all: a temporary file beside it, flushed to disk, then renamed."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with tmp.open("w", encoding="utf-8") as f:
            f.write(text)
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


STOP = []  # the signals received; the first asks the run to stop at the next safe point


class StopRun(Exception):
    """Raised at a safe point once a stop is asked for: the step under way is dropped whole."""


def stop_point():
    """Nothing of the step under way is applied before it; all ranks pass the same ones and stop at the same one."""
    if all_sum([len(STOP)])[0]:
        raise StopRun


@contextmanager
def timed(phase: str, clock: dict):
    """clock[phase_s]: its seconds once the GPU is done, and on CUDA clock[phase_gb]: its peak memory. An
    out-of-memory error leaves with the phase's name as a note."""
    cuda, start = torch.cuda.is_initialized(), time.perf_counter()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    try:
        yield
        if cuda:
            torch.cuda.synchronize()
    except torch.OutOfMemoryError as e:
        e.add_note(phase)
        raise
    clock[f"{phase}_s"] = time.perf_counter() - start
    if cuda:
        clock[f"{phase}_gb"] = torch.cuda.max_memory_allocated() / 1e9


RULES = {  # flag: (allowed?, what is allowed); any other number must be at least 0, a choice one of its choices
    "group_size": (lambda v: v >= 2, "at least 2: advantages compare the samples of a group"),
    "tau_p": (lambda v: 0 < v < 1, "a probability in (0, 1); the paper uses 0.002"),
    "q": (lambda v: 0 <= v <= 1, "a quantile in [0, 1]; the paper uses 0.75"),
    "top_p": (lambda v: 0 < v <= 1, "in (0, 1]"), "entropy_top": (lambda v: 0 < v <= 1, "a share in (0, 1]"),
    "eps_low": (lambda v: 0 <= v < 1, "in [0, 1)"), "dual_clip": (lambda v: v == 0 or v > 1, "0 (off) or above 1"),
    "device": (lambda v: re.fullmatch(r"auto|cpu|cuda(:\d+)?", v), "auto, cpu, cuda or cuda:N"),
    **{k: (lambda v: v > 0, "above 0") for k in ("temperature", "lr", "grad_clip")},
    **{k: (lambda v: v >= 1, "at least 1") for k in ("prompts_per_step", "max_prompt_tokens", "max_new_tokens",
       "steps", "mini_batches", "micro_batch_tokens", "save_every", "dist_timeout_min")},
}  # fmt: skip


def parse_args(argv=None) -> Config:
    """Flags from the dataclass, each bad value named in one line before anything loads. With --resume, the
    checkpoint's saved config is the base and the flags given go on top."""
    parser = argparse.ArgumentParser(prog="stapo.py", description=__doc__.split("\n")[0],
                                     epilog="memory plan: python plan.py; curves: python plot.py RUN_DIR")  # fmt: skip
    parser.error = lambda message: parser.exit(2, f"stapo.py: error: {message}\n")  # one line; --help has usage
    choices = {
        f.name: f.type.__args__ for f in dataclasses.fields(Config) if getattr(f.type, "__origin__", 0) is Literal
    }
    for f in dataclasses.fields(Config):
        parser.add_argument(f"--{f.name.replace('_', '-')}", type=f.type if f.type in (int, float) else str,
                            choices=choices.get(f.name), default=argparse.SUPPRESS, help=f"{f.metadata['help']} "
                            f"({f.default})")  # fmt: skip
    given = vars(parser.parse_args(argv))  # the flags given, and only those
    base = saved_config(Path(given["resume"]), given, parser.error) if given.get("resume") else {}
    tiny = TINY_DEFAULTS if given.get("model", base.get("model")) in TINY else {}  # CPU-sized unless given
    cfg, world = Config(**{**tiny, **base, **given}), int(os.environ.get("WORLD_SIZE", 1))
    for name, value in dataclasses.asdict(cfg).items():  # the flags given and a saved config alike
        ok, allowed = (choices[name].__contains__, f"one of {choices[name]}") if name in choices else RULES.get(
            name, (lambda v: not isinstance(v, int | float) or v >= 0, "at least 0"))  # fmt: skip
        finite = not isinstance(value, float) or math.isfinite(value)
        if not finite or value is not None and not ok(value):
            parser.error(f"--{name.replace('_', '-')} {value}: must be {allowed if finite else 'a finite number'}")
    if cfg.prompts_per_step % (cfg.mini_batches * world):  # torchrun: each process holds whole groups
        parser.error(f"--prompts-per-step {cfg.prompts_per_step} must be divisible by --mini-batches "
                     f"{cfg.mini_batches}" + (f" x {world} processes" if world > 1 else ""))  # fmt: skip
    if cfg.device.startswith("cuda") and not torch.cuda.device_count() > int(cfg.device[5:] or 0):
        parser.error(f"--device {cfg.device}: this machine has {torch.cuda.device_count()} CUDA devices")
    if cfg.report_to != "none" and importlib.util.find_spec(cfg.report_to) is None:
        parser.error(f"--report-to {cfg.report_to} needs the {cfg.report_to} package: pip install {cfg.report_to}")
    return cfg


def saved_config(ckpt: Path, given: dict, error) -> dict:
    """The config a checkpoint was trained with, checked against the flags given with --resume."""
    try:
        base = json.loads((ckpt / "stapo_config.json").read_text()) if checkpoint_step(ckpt) >= 0 else None
        steps, world = given.get("steps", base["steps"]), base.pop("world_size", 1)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        error(f"--resume {ckpt}: not a checkpoint of this trainer (a step-N folder with a trainer_state.pt and a "
              "readable stapo_config.json)")  # fmt: skip
    for wrong, why in (
        (world != int(os.environ.get("WORLD_SIZE", 1)), f"was written by {world} process(es): resume with as many"),
        (given.get("model", base["model"]) != base["model"], f"holds weights trained from {base['model']}, and those "
         "are what resumes: drop --model"),
        (steps <= checkpoint_step(ckpt), f"is at step {checkpoint_step(ckpt)} already, and --steps {steps} counts all "
         "the steps of the run: give more"),
    ):  # fmt: skip
        if wrong:
            error(f"--resume {ckpt}: {why}")
    names = {f.name for f in dataclasses.fields(Config)}
    return {k: v for k, v in base.items() if k in names} | {"output_dir": str(ckpt.parent)}  # its own run, unless given


# ----------------------------------------------------------------------------------------------
# E. Fitting the memory, decided once before the weights load: gradient checkpointing, and how many sequences
# one generate call holds. GB is 1e9 bytes; n parameters, W ranks. plan.py prints every part, phase by phase.

HEADROOM = 0.9  # plan to 90 % of what is free: the CUDA allocator rounds and fragments


def sizes(c) -> tuple[int, ...]:
    """(n parameters, of a layer, D hidden, M MLP, H heads, K KV heads, d head width, L layers, V vocabulary)."""
    D, M, H, K, L, V = (c.hidden_size, c.intermediate_size, c.num_attention_heads, c.num_key_value_heads,
                        c.num_hidden_layers, c.vocab_size)  # fmt: skip
    d = getattr(c, "head_dim", None) or D // H
    layer = 2 * D * H * d + 2 * D * K * d + 3 * D * M + 2 * D + 2 * d  # attention, MLP, norms
    return L * layer + V * D * (1 if getattr(c, "tie_word_embeddings", False) else 2) + D, layer, D, M, H, K, d, L, V


def kv_bytes_per_token(c, bf16: bool) -> int:
    """KV-cache bytes per token of a sequence: K and V of every layer."""
    n, layer, D, M, H, K, d, L, V = sizes(c)
    return 2 * L * K * d * (2 if bf16 else 4)


def activation_bytes_per_token(c) -> int:
    """Bytes autograd keeps per token per decoder layer (fp32 weights, bf16 autocast), as measured at the widths of
    Qwen3-1.7B and 8B (test_plan.py): 26 D for the RMSNorms and casts, 8 M for the MLP, 10 (H + K) d for q/k norms
    and attention, 8 H + 4 K + 8 for reciprocals and logsumexp. GPUs before sm80 (math attention) keep far more."""
    n, layer, D, M, H, K, d, L, V = sizes(c)
    return 26 * D + 8 * M + 10 * (H + K) * d + 8 * H + 4 * K + 8


def fit(c, cfg: Config, world: int, device_bytes: float, bf16: bool) -> dict:
    """The two decisions: gradient checkpointing (on if a micro-batch's update would not fit without it), and the
    sequences per generate call (what the weights and AdamW states leave free, in as few calls as fit, evenly)."""
    n, layer, D, M, H, K, d, L, V = sizes(c)
    budget, seq = HEADROOM * device_bytes, cfg.max_prompt_tokens + cfg.max_new_tokens
    tokens = max(1, cfg.micro_batch_tokens // seq) * seq  # a full micro-batch of full-length sequences
    state = 16 * n / world  # fp32 weights, gradients and AdamW's two moments, sharded under torchrun
    per_layer = activation_bytes_per_token(c) + 4 * (H - K) * d + 2 * seq  # + K/V repeated for H heads, the mask
    # bf16 copies of the weights for compute, the LM head's gradients at most, every layer's activations
    update = state + 2 * n * bf16 + 12 * V * D + tokens * (L * per_layer + 12 * D)
    checkpointing = cfg.gradient_checkpointing == "on" or (cfg.gradient_checkpointing == "auto" and update > budget)
    sampled = 2 * n * bf16 if world == 1 else (2 if bf16 else 4) * n  # a bf16 copy, or FSDP2's gathered model
    resident = 12 * n / world + sampled  # fp32 weights and AdamW states stay; gradients are freed by then
    # per sequence: its KV cache, the sampler's fp32 logits, probabilities and top-p sort, a layer's prefill
    per_sequence = seq * kv_bytes_per_token(c, bf16) + 20 * V + cfg.max_prompt_tokens * (6 * M + 14 * D)
    rollouts = cfg.prompts_per_step * cfg.group_size // world
    per_call = max(1, cfg.generate_batch or int((budget - resident) // per_sequence))
    per_call = min(per_call, math.ceil(rollouts / math.ceil(rollouts / per_call)))  # evenly filled
    return {"budget": budget, "state": state, "checkpointing": checkpointing, "generate_batch": per_call,
            "generation": resident + per_call * per_sequence, "per_sequence": per_sequence, "tokens": tokens,
            "per_layer": per_layer}  # fmt: skip


def device_memory(cfg: Config, device: torch.device) -> float:
    """Bytes to plan for: --gpu-memory-gb, else what is free on the GPU (the CUDA context, other processes and
    NCCL's buffers are not) plus what this process's allocator holds, else the RAM."""
    if cfg.gpu_memory_gb > 0:
        return cfg.gpu_memory_gb * 1e9
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_reserved(device)
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def fit_memory(model_config, cfg: Config, device: torch.device, world: int = 1) -> tuple[Config, dict]:
    """cfg with checkpointing and the generate batch decided, and the figures; one line and exit, before anything
    loads, when the fp32 weights, gradients and AdamW states alone cannot fit."""
    m, gb = fit(model_config, cfg, world, device_memory(cfg, device), uses_bf16(cfg, device)), 1e9
    if m["state"] > m["budget"]:
        sys.exit(f"{cfg.model}: its fp32 weights, gradients and AdamW states alone need {m['state'] / gb:.1f} GB "
                 f"per process, more than the {m['budget'] / gb:.1f} GB planned for on {device}; python plan.py with "
                 "the same flags says what fits (more GPUs under torchrun)")  # fmt: skip
    checkpointing = "on" if m["checkpointing"] else "off"
    print(f"memory: {m['budget'] / gb:.1f} GB planned for on {device} | gradient checkpointing {checkpointing} | "
          f"{m['generate_batch']} sequences per generate call, {m['generation'] / gb:.1f} GB")  # fmt: skip
    return dataclasses.replace(cfg, gradient_checkpointing=checkpointing, generate_batch=m["generate_batch"]), m


# ----------------------------------------------------------------------------------------------
# F. Several GPUs: torchrun + FSDP2. Each rank holds whole groups of every mini-batch (my_share). What the paper
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
    counts = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(world)]
    dist.all_gather(counts, torch.tensor([t.numel()], device=device))
    parts = [torch.empty(int(max(counts)), dtype=t.dtype, device=device) for _ in range(world)]
    dist.all_gather(parts, F.pad(t.to(device), (0, int(max(counts)) - t.numel())))  # all_gather wants equal sizes
    return torch.cat([part[: int(n)] for part, n in zip(parts, counts, strict=True)]).to(t.device)


def all_records(records: list) -> list:
    """Python records of every rank, in rank order."""
    if not dist.is_initialized():
        return records
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, records)
    return [r for part in gathered for r in part]


def my_share(items: list, mini_batches: int) -> list:
    """This rank's items of a step: its slice of every mini-batch, so mini-batch k holds the same as in one process."""
    rank, world = rank_and_world()
    size = len(items) // mini_batches // world
    return [x for k in range(mini_batches) for x in items[(k * world + rank) * size : (k * world + rank + 1) * size]]


def lock_step(batches: list[list[int]]) -> list[list[int]]:
    """As many micro-batches on every rank as on the busiest, empty ones last (FSDP2's collectives pair up)."""
    return batches + [[]] * (int(all_cat(torch.tensor([len(batches)])).max()) - len(batches))


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
    if not hasattr(fsdp.FSDPModule, "set_force_sum_reduction_for_comms"):
        sys.exit(f"torchrun needs FSDP2's sum reduction (torch 2.8 or later); this is torch {torch.__version__}")
    precision = fsdp.MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else None
    for module in [*model.model.layers, model]:
        fsdp.fully_shard(module, mp_policy=precision or fsdp.MixedPrecisionPolicy())
    for group in (m for m in model.modules() if isinstance(m, fsdp.FSDPModule)):
        group.set_gradient_divide_factor(1.0)
        group.set_force_sum_reduction_for_comms(True)  # a plain sum: gloo has no pre-multiplied one
    model.sharded_body = lambda **kwargs: model.base_model(**kwargs)  # sequence_logp calls the body alone,
    fsdp.register_fsdp_forward_method(model, "sharded_body")  # which must still gather the root's weights
    return model


def load_sharded_model(name: str, device: torch.device, tokenizer, seed: int = 0, bf16: bool = False):
    """Every rank builds the model on the meta device, in fp32 whatever its config says, and shards it; rank 0
    alone reads the weights and sends each rank its shards, so no other rank ever holds the whole model."""
    whole = load_model(name, torch.device("cpu"), tokenizer, seed) if dist.get_rank() == 0 else None  # rank 0 only
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(load_model_config(name), dtype=torch.float32)
    shard_model(model, bf16).to_empty(device=device)
    options = dcp.StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    dcp.set_model_state_dict(model, whole.state_dict() if whole is not None else {}, options=options)
    for key, buffer in model.named_buffers():  # not in a state dict: the rotary frequencies
        if whole is not None:
            buffer.copy_(whole.get_buffer(key))
        dist.broadcast(buffer, src=0)
    generation_config = [whole.generation_config if whole is not None else None]  # its EOS ids
    dist.broadcast_object_list(generation_config, src=0)
    model.generation_config = generation_config[0]
    return model


if __name__ == "__main__":
    main()
