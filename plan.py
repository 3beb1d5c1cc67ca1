"""The memory plan of a STAPO run, phase by phase, from the model's config alone: no weights, no GPU needed.

    python plan.py --model Qwen/Qwen3-1.7B-Base                    # one 80 GB GPU (or the GPU this machine has)
    python plan.py --model Qwen/Qwen3-8B-Base --gpus 8             # one rank of torchrun on 8 GPUs
    python plan.py --model Qwen/Qwen3-1.7B-Base --gpu-memory-gb 141 --max-new-tokens 8192   # any stapo.py flag

stapo.py decides two things once, before its weights load (stapo.fit):
gradient checkpointing, and how many sequences one generate call holds. This tool prints every part of that
arithmetic in the phase where it is alive, the peak of each phase, and when a peak does not fit, the fewest
changes that make it fit (more GPUs, checkpointing, a smaller micro-batch, a smaller generate batch,
shorter answers), each with its peak. eval.py sizes its generate calls with eval_plan, below.
"""

import argparse
import dataclasses
import itertools
import math
import sys

import torch

import stapo

PHASES = {  # the parts alive at the peak of each phase of a step
    "generation": ("weights", "adamw", "rollout_weights", "kv_cache", "sampling"),
    "scoring": ("weights", "adamw", "compute_weights", "forward_working", "lm_head_chunk"),
    "update": ("weights", "gradients", "adamw", "compute_weights", "activations", "lm_head_backward", "recompute",
               "tied_grads"),  # not all at once: plan_memory takes the update's peak part by part
    "optimizer step": ("weights", "gradients", "adamw", "optimizer_temporaries"),
}  # fmt: skip
PART_LABELS = {
    "weights": "fp32 weights", "gradients": "fp32 gradients", "adamw": "AdamW states (2 x fp32)",
    "optimizer_temporaries": "AdamW step temporaries", "compute_weights": "bf16 weight copies (autocast / FSDP)",
    "rollout_weights": "weights for sampling (bf16 / FSDP)", "kv_cache": "KV cache of one generate call",
    "sampling": "sampler logits + prefill", "forward_working": "forward without grad",
    "activations": "activations of a micro-batch", "lm_head_chunk": "LM-head chunk (--logit-chunk)",
    "lm_head_backward": "LM head in backward (chunk, gradient)", "recompute": "a layer recomputed (later)",
    "tied_grads": "tied: 3 embedding grads (at the end)",
}  # fmt: skip


def plan_memory(model_config, cfg: stapo.Config, world_size: int = 1, device_bytes: float | None = None,
                device_type: str = "cuda") -> dict:  # fmt: skip
    """Every part one rank holds and the peak of each phase (PHASES), after the two decisions a run takes with
    stapo.fit (gradient checkpointing, the generate batch); device_bytes: --gpu-memory-gb, else 80 GB. Measured
    against the allocations of a real-width backward in test_plan.py."""
    c, W = model_config, world_size
    if getattr(c, "num_experts", None) or getattr(c, "num_local_experts", None):
        raise SystemExit(f"{cfg.model}: a mixture of experts ({c.model_type}); the plan covers dense decoders")
    bf16 = stapo.uses_bf16(cfg, torch.device(device_type))
    fit = stapo.fit(c, cfg, W, device_bytes or (cfg.gpu_memory_gb or 80) * 1e9, bf16)
    n, layer, D, M, H, K, d, L, V = stapo.sizes(c)
    seq, ckpt, tied = cfg.max_prompt_tokens + cfg.max_new_tokens, fit["checkpointing"], c.tie_word_embeddings
    tokens, per_layer = fit["tokens"], fit["per_layer"]  # a full micro-batch; a layer's activations per token
    chunk = min(cfg.logit_chunk or tokens, tokens)
    kv = fit["generate_batch"] * seq * stapo.kv_bytes_per_token(c, bf16)
    plan = {
        "budget": fit["budget"], "parameters": n, "tokens": tokens, "gradient_checkpointing": ckpt,
        "generate_batch": fit["generate_batch"],
        "generate_calls": -(-cfg.prompts_per_step * cfg.group_size // W // fit["generate_batch"]),
        "weights": 4 * n / W, "gradients": 4 * n / W, "adamw": 8 * n / W, "optimizer_temporaries": 4 * n / W,
        # bf16 copies for compute: autocast's, kept for backward (not the embedding table's), and the LM head's;
        # with checkpointing only the head's; under FSDP2 the gathered root and about two layers at a time
        "compute_weights": (2 * V * D if ckpt else 2 * (n - V * D * (not tied))) * bf16 if W == 1 else
                           (2 if bf16 else 4) * (n - (L - 2) * layer),
        "rollout_weights": fit["generation"] - 12 * n / W - fit["generate_batch"] * fit["per_sequence"],
        "kv_cache": kv, "sampling": fit["generate_batch"] * fit["per_sequence"] - kv,
        "forward_working": tokens * (6 * M + 14 * D),  # one layer's transients without grad, the hidden states
        "activations_full": tokens * (L * per_layer + 12 * D),  # + the final norm and the LM head's input
        "activations_checkpointed": tokens * (L * 4 * D + 12 * D),  # each layer's fp32 input, the head's input
        # later in backward, checkpointing recomputes one layer: 1.12x its activations (measured), its bf16 copies
        "recompute": (tokens * 1.12 * per_layer + 2 * layer * bf16) * ckpt,
        "lm_head_chunk": 16 * chunk * V,  # fp32 logits, log-probs and their gradients
        # the head in backward: a chunk recomputed while the head's bf16 gradient adds up, then that gradient cast
        # back to fp32 (the head's bf16 copy freed by then): the larger of the two
        "lm_head_backward": max(16 * chunk * V + 2 * V * D * bf16, 4 * V * D),
        # tied: at the end of backward the head's fp32 gradient waits for the embedding's, then both are summed
        "tied_grads": 12 * V * D * tied,
    }  # fmt: skip
    plan["activations"] = plan["activations_checkpointed" if ckpt else "activations_full"]
    for phase, parts in PHASES.items():
        plan[f"peak_{phase.replace(' ', '_')}"] = sum(plan[k] for k in parts)
    # the update's parts do not all live at once: every activation with the head's backward, or later a layer
    # recomputed (a tied head's gradient still waiting), or at the very end the tied gradients alone
    later = plan["recompute"] + 4 * V * D * tied
    busiest = plan["compute_weights"] + plan["activations"] + max(plan["lm_head_backward"], later)
    plan["peak_update"] = 16 * n / W + max(busiest, plan["tied_grads"])
    plan["peak"] = max(plan[f"peak_{phase.replace(' ', '_')}"] for phase in PHASES)
    return plan


def summary(plan: dict) -> str:
    return (
        f"plan: peak {plan['peak'] / 1e9:.1f} GB of {plan['budget'] / 1e9:.1f} GB "
        f"({'fits' if plan['peak'] <= plan['budget'] else 'DOES NOT FIT'}) | gradient checkpointing "
        f"{'on' if plan['gradient_checkpointing'] else 'off'} | micro-batch {plan['tokens']:,} tokens, activations "
        f"{plan['activations'] / 1e9:.1f} GB | {plan['generate_calls']} generate call(s) per step of "
        f"{plan['generate_batch']} sequences, KV cache {plan['kv_cache'] / 1e9:.1f} GB"
    )


def table(plan: dict, c, cfg: stapo.Config, gpus: int) -> str:
    head = f"{'part (GB)':<38}" + "".join(f"{phase:>16}" for phase in PHASES)
    lines = [f"memory plan: {cfg.model} ({plan['parameters'] / 1e9:.2f} B parameters, {c.num_hidden_layers} layers, "
             f"hidden {c.hidden_size}), {gpus} GPU(s) of {plan['budget'] / stapo.HEADROOM / 1e9:.0f} GB each, "
             f"planned to {stapo.HEADROOM:.0%} = {plan['budget'] / 1e9:.1f} GB", head, "-" * len(head)]  # fmt: skip
    for key, label in ((k, v) for k, v in PART_LABELS.items() if plan[k]):  # the parts this setting has
        lines.append(f"{label:<38}" + "".join(f"{plan[key] / 1e9:16.1f}" if key in parts else f"{'-':>16}"
                                              for parts in PHASES.values()))  # fmt: skip
    lines.append(f"{'peak':<38}" + "".join(f"{plan['peak_' + p.replace(' ', '_')] / 1e9:16.1f}" for p in PHASES))
    return "\n".join([*lines, summary(plan)])


def fixes_that_fit(model_config, cfg: stapo.Config, world_size: int, device_bytes: float, device_type: str) -> str:
    """What brings the planned peak within the budget: the fewest GPUs (none added on a CPU), then the fewest
    kinds of change (checkpointing, a smaller micro-batch, a smaller generate batch, shorter answers), each
    combination with its peak; or why nothing does."""
    seq = cfg.max_prompt_tokens + cfg.max_new_tokens
    kinds = [k for k in (  # each kind's options, mildest first
        [{"gradient_checkpointing": "on"}] if cfg.gradient_checkpointing != "on" else [],
        [{"micro_batch_tokens": n * seq} for n in range(cfg.micro_batch_tokens // seq - 1, 0, -1)],
        [{"generate_batch": 0}] if cfg.generate_batch > 0 else [],
        [{"max_new_tokens": cfg.max_new_tokens // 2**k} for k in (1, 2, 3)],
    ) if k]  # fmt: skip
    gpu_counts = [world_size] + ([n for n in (2, 4, 8, 16, 32, 64) if n > world_size] if device_type == "cuda" else [])

    def tried(change: dict, gpus: int) -> tuple[bool, str]:  # (fits, the change described with its peak)
        plan = plan_memory(model_config, dataclasses.replace(cfg, **change), gpus, device_bytes, device_type)
        flags = [f"--{k.replace('_', '-')} {v}" for k, v in change.items()] + [f"{gpus} GPUs"] * (gpus > world_size)
        calls = plan["generate_calls"]  # many small generate calls decode slowly
        slow = f", {calls} generate calls of {plan['generate_batch']}: slow" if calls >= 8 else ""
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
    most = {k: v for o in kinds for k, v in o[-1].items()}  # every change at its most
    plan = plan_memory(model_config, dataclasses.replace(cfg, **most), gpu_counts[-1], device_bytes, device_type)
    peak, phase = max((plan[f"peak_{p.replace(' ', '_')}"], p) for p in PHASES)
    biggest = ", ".join(
        f"{PART_LABELS[k]} {plan[k] / 1e9:.1f} GB" for k in sorted(PHASES[phase], key=lambda k: -plan[k])[:3]
    )
    every = tried(most, gpu_counts[-1])[1].split(" (")[0] or "every change"
    return f"nothing fits: even with {every}, the {phase} peak is {peak / 1e9:.1f} GB, mostly {biggest}"


def eval_plan(model_config, device_bytes: float, bf16: bool, prompt_tokens: int, max_new_tokens: int,
              generate_batch: int = 0, sequences: int = 0) -> dict:  # fmt: skip
    """eval.py's generate calls: the weights (bf16 on a GPU; no gradients, no AdamW) and per sequence what stapo.fit
    counts (its KV cache, the sampler's memory); generate_batch 0: as many sequences as HEADROOM leaves room for,
    and no more than the `sequences` there are to sample (0: no limit)."""
    cfg = stapo.Config(max_prompt_tokens=prompt_tokens, max_new_tokens=max_new_tokens, generate_batch=1)
    fit, seq = stapo.fit(model_config, cfg, 1, device_bytes, bf16), prompt_tokens + max_new_tokens
    weights, kv = (2 if bf16 else 4) * stapo.sizes(model_config)[0], seq * stapo.kv_bytes_per_token(model_config, bf16)
    n = generate_batch or max(1, min(int((fit["budget"] - weights) // fit["per_sequence"]), sequences or math.inf))
    return {"bf16": bf16, "weights": weights, "sequences_per_call": n, "tokens_per_sequence": seq, "kv_cache": n * kv,
            "sampling": n * (fit["per_sequence"] - kv), "budget": fit["budget"],
            "total": weights + n * fit["per_sequence"]}  # fmt: skip


def eval_plan_line(plan: dict, name: str) -> str:
    fits, gb = "fits" if plan["total"] <= plan["budget"] else "DOES NOT FIT", 1e9
    return (f"plan: {name} weights {plan['weights'] / gb:.1f} GB ({'bf16' if plan['bf16'] else 'fp32'}) + KV "
            f"{plan['kv_cache'] / gb:.1f} GB + sampler {plan['sampling'] / gb:.1f} GB for {plan['sequences_per_call']} "
            f"sequences of {plan['tokens_per_sequence']:,} tokens per generate call = {plan['total'] / gb:.1f} GB "
            f"of {plan['budget'] / gb:.1f} GB ({fits})")  # fmt: skip


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog="and any flag of stapo.py")
    parser.add_argument("--gpus", type=int, default=1, help="GPUs of a torchrun run to plan one rank of (1)")
    own, rest = parser.parse_known_args(argv)
    if own.gpus < 1:
        parser.error(f"--gpus {own.gpus}: must be at least 1")
    cfg = stapo.parse_args(rest)
    if cfg.prompts_per_step % (cfg.mini_batches * own.gpus):
        parser.error(f"--prompts-per-step {cfg.prompts_per_step} must be divisible by --mini-batches "
                     f"{cfg.mini_batches} x {own.gpus} GPUs")  # fmt: skip
    cuda = torch.cuda.is_available() and not cfg.gpu_memory_gb
    device_bytes = stapo.device_memory(cfg, torch.device("cuda")) if cuda else (cfg.gpu_memory_gb or 80) * 1e9
    with stapo.loading("--model", cfg.model):
        c = stapo.load_model_config(cfg.model)
    plan = plan_memory(c, cfg, own.gpus, device_bytes)
    print(table(plan, c, cfg, own.gpus))
    if plan["peak"] > plan["budget"]:
        print(f"does not fit; {fixes_that_fit(c, cfg, own.gpus, device_bytes, 'cuda')}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
