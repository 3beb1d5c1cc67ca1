"""Tests for stapo.py on CPU with a tiny random Qwen3: `pytest -q`."""

import copy
import dataclasses
import datetime
import importlib.machinery
import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import pytest
import torch

import eval as ev
import stapo

HERE = Path(__file__).parent
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tiny():
    return stapo.load_policy("tiny", CPU, seed=0)


def tiny_cfg(tmp_path=None, **overrides) -> stapo.Config:
    base = dict(model="tiny", dataset="toy", prompts_per_step=4, group_size=4, max_new_tokens=12, lr=1e-3,
                warmup_steps=1, output_dir=str(tmp_path or "unused"), save_every=1000)  # fmt: skip
    return stapo.Config(**{**base, **overrides})


# ----------------------------------------------------------------------------------------------
# S2T mask, advantages, loss: hand-built tensors


def test_s2t_silences_the_rare_token_in_a_confident_state():
    # One positive answer of 4 tokens. Tokens 1, 2, 3 are rare (p < tau_p); their entropies are
    # 0.1, 2.0, 3.0, so tau_h = quantile([0.1, 2.0, 3.0], 0.75) = 2.5 and tokens 1 and 2 fall below.
    p = torch.tensor([[0.9, 0.001, 0.001, 0.001]])
    entropy = torch.tensor([[0.05, 0.1, 2.0, 3.0]])
    mask = torch.ones(1, 4, dtype=torch.bool)
    spurious = stapo.s2t_mask(p.log(), entropy, torch.tensor([1.0]), mask, tau_p=0.002, q=0.75)
    assert spurious.tolist() == [[False, True, True, False]]


def test_s2t_threshold_is_absolute_probability_and_strict_entropy():
    # token 0 is likely (p = 0.5): never a candidate, however low its entropy
    p = torch.tensor([[0.5, 0.001, 0.001]])
    entropy = torch.tensor([[0.0, 1.0, 1.0]])  # tau_h = 1.0, and 1.0 < 1.0 is false
    spurious = stapo.s2t_mask(p.log(), entropy, torch.tensor([1.0]), torch.ones(1, 3, dtype=torch.bool))
    assert not spurious.any()


def test_a_token_whose_p_equals_tau_p_is_not_a_candidate():
    # candidates need p < tau_p, strictly: tokens 0 and 1 sit exactly on it, tokens 2 and 3 just below
    logp = torch.full((1, 4), math.log(0.002))
    logp[0, 2:] -= 1e-3
    entropy = torch.tensor([[0.05, 0.05, 0.1, 5.0]])
    s2t = stapo.s2t_select(logp, entropy, torch.tensor([1.0]), torch.ones(1, 4, dtype=torch.bool), 0.002, 0.75)
    assert s2t.n_candidates == 2 and s2t.spurious.tolist() == [[False, False, True, False]]


def test_s2t_negative_advantage_silences_nothing():
    p = torch.full((2, 4), 0.0001)
    entropy = torch.tensor([[0.1, 0.2, 0.3, 5.0], [0.1, 0.2, 0.3, 5.0]])
    spurious = stapo.s2t_mask(p.log(), entropy, torch.tensor([-1.0, 0.0]), torch.ones(2, 4, dtype=torch.bool))
    assert not spurious.any()


@pytest.mark.parametrize("n_rare", [0, 1])
def test_s2t_empty_or_single_candidate_masks_nothing(n_rare):
    p = torch.tensor([[0.9, 0.9, 0.9, 0.9]])
    p[0, :n_rare] = 0.0001
    spurious = stapo.s2t_mask(p.log(), torch.rand(1, 4), torch.tensor([1.0]), torch.ones(1, 4, dtype=torch.bool))
    assert not spurious.any()


def test_s2t_ignores_padding_and_uses_the_whole_minibatch_quantile():
    p = torch.full((2, 3), 0.0001)
    entropy = torch.tensor([[1.0, 2.0, 9.0], [3.0, 4.0, 0.0]])
    mask = torch.tensor([[True, True, False], [True, True, False]])  # the last column is padding
    spurious = stapo.s2t_mask(p.log(), entropy, torch.tensor([1.0, 1.0]), mask)
    # candidates H = [1, 2, 3, 4] over both rows -> tau_h = 3.25: rows are not thresholded separately
    assert spurious.tolist() == [[True, True, False], [True, False, False]]


def test_group_advantages_zscore_and_equal_groups():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0])
    adv = stapo.group_advantages(rewards, group_size=4)
    assert adv[4:].tolist() == [0.0] * 4  # all equal: no signal
    assert adv[0] > 0 > adv[1] and abs(adv[:4].sum()) < 1e-6
    assert torch.allclose(adv[:4], (rewards[:4] - 0.25) / rewards[:4].std(), atol=1e-5)


def test_high_entropy_keeps_the_top_share():
    entropy = torch.arange(10.0).view(1, 10)
    keep = stapo.high_entropy_keep(entropy, torch.ones(1, 10, dtype=torch.bool), top=0.2)
    assert keep.nonzero()[:, 1].tolist() == [8, 9]


def test_loss_everything_masked_is_zero_not_nan():
    logp = torch.zeros(2, 3, requires_grad=True)
    keep = torch.zeros(2, 3, dtype=torch.bool)
    loss = stapo.policy_loss(logp, logp.detach(), torch.ones(2), keep, num_kept=0)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(logp.grad, torch.zeros(2, 3))


def test_a_silenced_token_with_a_huge_ratio_leaves_no_nan():
    """exp(logp - old) of a silenced token can overflow to inf; inf * 0 would make the gradient NaN."""
    logp = torch.tensor([[0.0, 1000.0, -1.0]], requires_grad=True)  # token 1: ratio e^1000 = inf
    keep = torch.tensor([[True, False, True]])
    loss = stapo.policy_loss(logp, torch.zeros(1, 3), torch.ones(1), keep, num_kept=2)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logp.grad).all() and logp.grad[0, 1] == 0


def test_masked_tokens_get_zero_gradient_and_loss_is_mean_over_kept():
    torch.manual_seed(0)
    logp = (torch.rand(2, 4) * -3).requires_grad_()
    old = logp.detach() + 0.05 * torch.randn(2, 4)
    adv = torch.tensor([1.5, -0.5])
    keep = torch.tensor([[True, False, True, True], [True, True, False, False]])
    loss = stapo.policy_loss(logp, old, adv, keep, int(keep.sum()))
    loss.backward()
    assert torch.all(logp.grad[~keep] == 0) and torch.all(logp.grad[keep] != 0)
    ratio = (logp - old).exp()
    surrogate = torch.minimum(ratio * adv[:, None], ratio.clamp(0.8, 1.28) * adv[:, None])
    assert torch.allclose(loss, -surrogate[keep].mean())  # renormalised: a mean over kept tokens only


def test_mask_none_at_ratio_one_is_the_token_mean_pg_loss():
    logp = torch.log(torch.rand(3, 5)).requires_grad_()
    adv = torch.tensor([1.0, -2.0, 0.5])
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)
    loss = stapo.policy_loss(logp, logp.detach(), adv, mask, int(mask.sum()))
    expected = -(adv[:, None] * mask).sum() / mask.sum()
    assert torch.allclose(loss, expected)
    loss.backward()
    assert torch.allclose(logp.grad, -(adv[:, None] * mask) / mask.sum())  # grad of -A logp / N


def test_clip_higher_bounds():
    logp = torch.tensor([[math.log(2.0), math.log(0.5)]], requires_grad=True)
    keep = torch.ones(1, 2, dtype=torch.bool)
    positive = stapo.policy_loss(logp, torch.zeros(1, 2), torch.tensor([1.0]), keep, 2)
    assert torch.isclose(positive, -torch.tensor((1.28 + 0.5) / 2))  # ratio 2 capped at 1 + eps_high
    negative = stapo.policy_loss(logp, torch.zeros(1, 2), torch.tensor([-1.0]), keep, 2)
    assert torch.isclose(negative, torch.tensor((2.0 + 0.8) / 2))  # ratio 0.5 floored at 1 - eps_low


def test_tau_h_is_the_quantile_over_the_candidates_only():
    # Row 0 (A > 0): tokens 0-1 are likely (not candidates), tokens 2-5 rare; the last column is padding.
    # Row 1 (A < 0): rare tokens, but not candidates. Over the candidates H = [1, 2, 3, 4]: tau_h = 3.25.
    # Over every completion token of the mini-batch it would be 2.75, silencing token 4 no more.
    p = torch.tensor([[0.9, 0.9, 0.001, 0.001, 0.001, 0.001, 0.001], [0.001] * 7])
    entropy = torch.tensor([[0.0, 0.0, 1.0, 2.0, 3.0, 4.0, 0.0], [9.0] * 7])
    mask = torch.tensor([[True] * 6 + [False], [True] * 7])
    s2t = stapo.s2t_select(p.log(), entropy, torch.tensor([1.0, -1.0]), mask, tau_p=0.002, q=0.75)
    assert s2t.tau_h == pytest.approx(3.25) and s2t.n_candidates == 4
    assert s2t.spurious.nonzero().tolist() == [[0, 2], [0, 3], [0, 4]]


@pytest.mark.parametrize(
    ("ratio", "advantage", "dual_clip", "surrogate", "clipped"),
    [
        (2.0, 1.0, 0.0, 1.28, True),  # A > 0, ratio above 1 + eps_high: capped
        (0.5, 1.0, 0.0, 0.5, False),  # A > 0, ratio below 1 - eps_low: min keeps rho A, gradient flows
        (0.5, -1.0, 0.0, -0.8, True),  # A < 0, ratio below 1 - eps_low: floored
        (2.0, -1.0, 0.0, -2.0, False),  # A < 0, large ratio: unbounded without dual-clip
        (2.0, -1.0, 3.0, -2.0, False),  # dual-clip 3 leaves ratio 2 alone
        (5.0, -1.0, 3.0, -3.0, True),  # dual-clip bounds the loss at 3 |A|
        (5.0, 1.0, 3.0, 1.28, True),  # dual-clip is for A < 0 only
        (5.0, 0.0, 3.0, 0.0, False),  # A = 0: nothing to clip
    ],
)  # fmt: skip
def test_clipped_surrogate_and_where_the_clip_is_active(ratio, advantage, dual_clip, surrogate, clipped):
    s, c = stapo.clipped_surrogate(torch.tensor([[ratio]]), torch.tensor([advantage]), 0.2, 0.28, dual_clip)
    assert s.item() == pytest.approx(surrogate) and c.item() is clipped


def test_dual_clip_stops_the_gradient_of_huge_ratios_on_negative_answers():
    logp = torch.tensor([[math.log(5.0), math.log(2.0)]], requires_grad=True)
    keep = torch.ones(1, 2, dtype=torch.bool)
    loss = stapo.policy_loss(logp, torch.zeros(1, 2), torch.tensor([-1.0]), keep, 2, dual_clip=3.0)
    loss.backward()
    assert loss.item() == pytest.approx((3.0 + 2.0) / 2)
    assert logp.grad[0].tolist() == pytest.approx([0.0, 2.0 / 2])  # d(-rho A / 2)/d logp = rho / 2 for A = -1


def test_sequence_aggregation_is_the_grpo_per_answer_mean():
    # answers of 1 and 3 kept tokens, A = 2 and -1, on-policy (ratio 1): token mean vs GRPO's mean of means
    logp = torch.zeros(2, 3, requires_grad=True)
    keep = torch.tensor([[True, False, False], [True, True, True]])
    adv = torch.tensor([2.0, -1.0])
    token = stapo.policy_loss(logp, logp.detach(), adv, keep, stapo.loss_denominator(keep, "token"))
    sequence = stapo.policy_loss(logp, logp.detach(), adv, keep, stapo.loss_denominator(keep, "sequence"),
                                 loss_agg="sequence")  # fmt: skip
    assert token.item() == pytest.approx(-(2 - 3) / 4) and sequence.item() == pytest.approx(-(2 - 1) / 2)
    sequence.backward()
    expected = torch.tensor([[-2 / 2, 0, 0], [1 / 6, 1 / 6, 1 / 6]])  # -A / (answers x length)
    torch.testing.assert_close(logp.grad, expected)


def test_loss_denominators():
    keep = torch.tensor([[True, False, True], [False, False, False], [True, True, True]])
    assert stapo.loss_denominator(keep, "token") == 5 and stapo.loss_denominator(keep, "sequence") == 2


# ----------------------------------------------------------------------------------------------
# Log-probs: chunked = naive, training pass = sampler


def naive_logp_entropy(hidden, weight, targets, temperature):
    logits = (hidden @ weight.T).float() / temperature  # (b, T, V)
    logprobs = logits.log_softmax(-1)
    entropy = -(logprobs.exp() * logprobs).sum(-1)
    return logprobs.gather(-1, targets[..., None]).squeeze(-1), entropy


@pytest.mark.parametrize("chunk", [0, 1, 7, 64])
def test_chunked_logp_entropy_and_gradients_equal_naive(chunk):
    torch.manual_seed(0)
    hidden = torch.randn(2, 20, 16, requires_grad=True)
    weight = torch.randn(300, 16, requires_grad=True)
    targets = torch.randint(0, 300, (2, 20))
    ref_logp, ref_entropy = naive_logp_entropy(hidden, weight, targets, 0.7)
    ref_grads = torch.autograd.grad(ref_logp.sum(), (hidden, weight))
    logp, entropy = stapo.token_logp(hidden, weight, targets, 0.7, chunk, with_entropy=True)
    grads = torch.autograd.grad(logp.sum(), (hidden, weight))
    assert torch.allclose(logp, ref_logp, atol=1e-5) and torch.allclose(entropy, ref_entropy, atol=1e-5)
    assert all(torch.allclose(g, r, atol=1e-5) for g, r in zip(grads, ref_grads, strict=True))


# fp32: the same numbers. bf16: the sampler is generate's bf16 copy, the trainer fp32 weights under autocast;
# they differ by bf16 rounding (3e-3 here), and the ratios do not see it: score() recomputes old log-probs.
@pytest.mark.parametrize(("precision", "atol"), [("fp32", 1e-5), ("bf16-autocast", 1e-2)])
def test_training_logp_equals_sampler_logp_with_left_padding(tiny, precision, atol):
    from transformers import GenerationConfig

    model, tok = tiny
    cfg = tiny_cfg(temperature=0.7, max_new_tokens=10, precision=precision)
    texts = ["1+1?", "a much longer problem statement than the first one"]  # different lengths: left padding
    prompts = [stapo.encode_prompt(t, tok) for t in texts]
    ids, mask = stapo.left_pad(prompts, tok.pad_token_id)
    assert mask[0].sum() < mask.shape[1]  # the first prompt really is padded
    gen = GenerationConfig(do_sample=True, temperature=0.7, top_k=0, top_p=1.0, max_new_tokens=10,
                           eos_token_id=[-1], pad_token_id=tok.pad_token_id, output_scores=True,
                           return_dict_in_generate=True)  # fmt: skip
    torch.manual_seed(1)
    with stapo.sampling_weights(model, bf16=precision == "bf16-autocast") as sampler:
        out = sampler.generate(input_ids=ids, attention_mask=mask, generation_config=gen)  # Qwen3 has no dropout
    completions = out.sequences[:, ids.shape[1] :]  # (2, 10)
    sampled = torch.stack(out.scores, 1).float().log_softmax(-1).gather(-1, completions[..., None]).squeeze(-1)
    rollouts = stapo.Rollouts(prompts, completions, torch.ones_like(completions, dtype=torch.bool), torch.zeros(2))
    logp, _ = stapo.score(model, rollouts, [0, 1], cfg)
    assert torch.allclose(logp, sampled, atol=atol), (logp - sampled).abs().max()


def test_bf16_sampling_puts_the_fp32_master_weights_back_even_when_generate_fails(tiny, monkeypatch):
    model, tok = tiny
    before = {name: (p.data_ptr(), p.dtype) for name, p in model.named_parameters()}
    monkeypatch.setattr(model, "generate", lambda **kwargs: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        stapo.generate(model, tok, [stapo.encode_prompt("1+1?", tok)], tiny_cfg(precision="bf16-autocast"))
    assert {name: (p.data_ptr(), p.dtype) for name, p in model.named_parameters()} == before
    assert before["model.embed_tokens.weight"][1] == torch.float32


def test_bf16_rollouts_cache_bf16_keys_and_values_without_autocast(tiny, monkeypatch):
    """Under autocast, Qwen3's fp32 k-norm weight made the keys fp32: 1.5x the planned cache."""
    from transformers.cache_utils import DynamicLayer

    model, tok = tiny
    seen, update = [], DynamicLayer.update

    def recording_update(self, keys, values, *args, **kwargs):  # keys, values: (b, K, new tokens, d)
        seen.append((keys.dtype, values.dtype, torch.is_autocast_enabled("cpu"), keys, values))
        return update(self, keys, values, *args, **kwargs)

    monkeypatch.setattr(DynamicLayer, "update", recording_update)
    stapo.generate(model, tok, [stapo.encode_prompt("1+1?", tok)] * 3, tiny_cfg(precision="bf16-autocast"))
    assert {s[:3] for s in seen} == {(torch.bfloat16, torch.bfloat16, False)}
    layers = model.config.num_hidden_layers
    per_token = sum(k[0, :, 0].nbytes + v[0, :, 0].nbytes for *_, k, v in seen[:layers])  # one token, every layer
    assert per_token == stapo.kv_bytes_per_token(model.config, bf16=True)
    assert all(p.dtype == torch.float32 for p in model.parameters())  # the master weights are untouched


def test_lm_head_is_cast_once_per_micro_batch(tiny):
    from torch.utils._python_dispatch import TorchDispatchMode

    model, tok = tiny
    head = model.get_output_embeddings().weight

    class CountHeadCasts(TorchDispatchMode):
        casts = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._to_copy.default and args[0].shape == head.shape:
                CountHeadCasts.casts += 1
            return func(*args, **(kwargs or {}))

    cfg = tiny_cfg(precision="bf16-autocast", logit_chunk=8, max_new_tokens=24)
    rollouts, _ = rollout_batch(model, tok, cfg)
    with CountHeadCasts():
        logp, _ = stapo.sequence_logp(model, rollouts, [0, 1, 2], cfg)  # (3, T): several chunks of 8 tokens
        logp.sum().backward()
    model.zero_grad(set_to_none=True)
    assert math.ceil(3 * logp.shape[1] / 8) >= 4 and 1 <= CountHeadCasts.casts <= 2


def test_the_budget_is_what_is_free_on_the_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (70e9, 85e9))  # others hold 15 GB
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 2e9)  # this process's allocator
    assert stapo.device_memory(stapo.Config(), torch.device("cuda")) == 72e9
    assert stapo.device_memory(stapo.Config(gpu_memory_gb=40), torch.device("cuda")) == 40e9
    assert {"PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF"} & set(os.environ)  # set on import unless given


def test_phase_times_wait_for_the_gpu_and_record_its_peak(monkeypatch):
    """On CUDA, kernels run after the Python that launched them: a phase's seconds are read once the device has
    synchronised, and its peak memory with them. Here torch.cuda's calls are recorded in order."""
    calls = []
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda: calls.append("reset"))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: calls.append("synchronize"))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda: calls.append("peak") or 3e9)
    monkeypatch.setattr(stapo.time, "perf_counter", lambda: calls.append("clock") or len(calls))
    clock = {}
    with stapo.timed("update", clock):
        calls.append("work")
    assert calls == ["clock", "reset", "work", "synchronize", "clock", "peak"] and clock["update_gb"] == 3.0
    with pytest.raises(torch.OutOfMemoryError) as error, stapo.timed("generation", clock):
        raise torch.OutOfMemoryError("CUDA out of memory")
    assert error.value.__notes__ == ["generation"]  # the loop names the phase in its one line


def test_tiny_without_a_dataset_trains_on_the_toy_problems():
    cfg = stapo.parse_args(["--model", "tiny"])
    assert (cfg.dataset, cfg.prompts_per_step, cfg.max_new_tokens) == ("toy", 8, 64)
    assert stapo.parse_args(["--model", "tiny", "--dataset", "d.jsonl"]).dataset == "d.jsonl"  # given wins


def test_rollouts_cut_at_first_eos_and_keep_it(tiny):
    model, tok = tiny
    cfg = tiny_cfg(max_new_tokens=40)
    torch.manual_seed(0)
    prompt = stapo.encode_prompt("2+2?", tok)
    r = stapo.generate(model, tok, [prompt] * 16, cfg)
    eos = torch.tensor(stapo.eos_token_ids(model, tok))
    lengths = r.completion_mask.sum(1)
    for row in range(16):
        body = r.completions[row, : lengths[row]]
        is_eos = torch.isin(body, eos)
        assert bool(r.truncated[row]) == (not is_eos.any())
        if not r.truncated[row]:
            assert is_eos[-1] and not is_eos[:-1].any()  # ends on its first EOS, EOS included
    assert eos.tolist() == sorted({tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")})


def test_rollout_progress_shows_when_output_is_not_a_terminal(tiny, capsys, monkeypatch):
    model, tok = tiny
    monkeypatch.setattr(stapo.DecodeProgress.__init__, "__defaults__", (0.0,))  # a status at once, not after 30 s
    stapo.generate(model, tok, [stapo.encode_prompt("1+1?", tok)] * 3, tiny_cfg(max_new_tokens=6), desc="step 1")
    err = capsys.readouterr().err
    assert "step 1 (3 sequences): " in err and "/6 [" in err
    stapo.generate(model, tok, [stapo.encode_prompt("1+1?", tok)] * 3, tiny_cfg(max_new_tokens=6), desc="step 2")
    monkeypatch.undo()  # short work in a log file: nothing at all
    stapo.generate(model, tok, [stapo.encode_prompt("1+1?", tok)] * 3, tiny_cfg(max_new_tokens=6), desc="step 3")
    assert "step 3" not in capsys.readouterr().err


def test_generation_makes_calls_of_the_generate_batch(tiny):
    model, tok = tiny
    prompts = [torch.arange(20, 44)] * 7  # 3 generate calls: 3 + 3 + 1
    r = stapo.generate(model, tok, prompts, tiny_cfg(max_new_tokens=8, generate_batch=3), desc="x")
    assert r.completions.shape[0] == 7 and r.completion_mask[:, 0].all()


# ----------------------------------------------------------------------------------------------
# Updates: micro-batch invariance, precision


def rollout_batch(model, tok, cfg, seed=0):
    torch.manual_seed(seed)
    problems = (stapo.toy_problems() * cfg.prompts_per_step)[: cfg.prompts_per_step]  # two problems, repeated
    prompts = [stapo.encode_prompt(e["problem"], tok) for e in problems for _ in range(cfg.group_size)]
    rollouts = stapo.generate(model, tok, prompts, cfg)
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0] * (len(prompts) // 4))  # mixed groups: nonzero advantages
    return rollouts, stapo.group_advantages(rewards, cfg.group_size)


class RecordingSGD(torch.optim.SGD):
    """SGD that keeps a copy of the (clipped) gradients of its last step: ppo_update frees them after."""

    def step(self, closure=None):
        self.grads = [p.grad.clone() for group in self.param_groups for p in group["params"]]
        return super().step(closure)


def one_update(model, rollouts, advantages, cfg):
    model = copy.deepcopy(model)
    optimizer = RecordingSGD(model.parameters(), lr=0.0)  # grads only
    old_logp, entropy = stapo.score(model, rollouts, list(range(len(rollouts.prompts))), cfg)
    stats, _ = stapo.ppo_update(model, optimizer, rollouts, old_logp, entropy, advantages, cfg)
    names = [n for n, _ in model.named_parameters()]
    return stats["loss"], dict(zip(names, optimizer.grads, strict=True))


@pytest.mark.parametrize(("mask", "loss_agg"), [("s2t", "token"), ("none", "token"), ("high-entropy", "token"),
                                               ("s2t", "sequence")])  # fmt: skip
def test_micro_batch_invariance(tiny, mask, loss_agg):
    model, tok = tiny
    cfg = tiny_cfg(
        max_new_tokens=20, mask=mask, loss_agg=loss_agg, tau_p=0.5, grad_clip=1e9
    )  # tau_p 0.5: a random model has candidates
    rollouts, advantages = rollout_batch(model, tok, cfg)
    whole_loss, whole = one_update(model, rollouts, advantages, dataclasses.replace(cfg, micro_batch_tokens=10**6))
    split_loss, split = one_update(model, rollouts, advantages, dataclasses.replace(cfg, micro_batch_tokens=1))
    n_micro = len(stapo.micro_batches(rollouts, list(range(16)), 1))
    assert n_micro == 16
    assert abs(whole_loss - split_loss) < 1e-6
    worst = max((whole[n] - split[n]).abs().max().item() for n in whole)
    assert worst < 1e-6, worst


def test_a_micro_batch_padded_as_sequence_logp_lays_it_out_fits_its_token_budget():
    # Long prompt + short answer next to short prompt + long answer: each row is 12 tokens, but padded side by
    # side [prompt | completion] they are 10 + 10 = 20 wide. Rows x longest row (24) would put them together.
    prompts = [torch.ones(10, dtype=torch.long), torch.ones(2, dtype=torch.long)] * 2
    completion_mask = torch.tensor([[True] * 2 + [False] * 8, [True] * 10] * 2)
    rollouts = stapo.Rollouts(prompts, torch.ones(4, 10, dtype=torch.long), completion_mask, torch.zeros(4, dtype=bool))
    for budget in (24, 40, 60):
        batches = stapo.micro_batches(rollouts, [0, 1, 2, 3], budget)
        assert sorted(r for b in batches for r in b) == [0, 1, 2, 3]
        for b in batches:
            width = max(len(prompts[r]) for r in b) + int(completion_mask[b].sum(1).max())
            assert len(b) == 1 or len(b) * width <= budget, (budget, batches)
    assert len(stapo.micro_batches(rollouts, [0, 1, 2, 3], 40)) == 2  # 2 rows of 20, not 4 of 12 with padding


@pytest.mark.parametrize("micro_batch_tokens", [16384, 1])  # one micro-batch, or one per answer
@pytest.mark.parametrize(("mask", "loss_agg"), [("s2t", "token"), ("high-entropy", "token"), ("none", "sequence")])
def test_ppo_update_divides_by_the_kept_tokens_of_the_mini_batch(tiny, mask, loss_agg, micro_batch_tokens):
    # On-policy the ratio is 1 and the surrogate of a kept token is its A: the loss is -mean(A) over the
    # kept tokens (token) or over the answers that keep a token (sequence), however the micro-batches cut them.
    # Silenced tokens are in neither.
    model, tok = tiny
    cfg = tiny_cfg(max_new_tokens=20, mask=mask, loss_agg=loss_agg, tau_p=0.01, micro_batch_tokens=micro_batch_tokens)
    rollouts, advantages = rollout_batch(model, tok, cfg)
    model = copy.deepcopy(model)
    old_logp, entropy = stapo.score(model, rollouts, list(range(16)), cfg)
    keep, _ = stapo.loss_mask(old_logp, entropy, advantages, rollouts.completion_mask, cfg)
    stats, silenced = stapo.ppo_update(model, RecordingSGD(model.parameters(), lr=0.0), rollouts, old_logp, entropy,
                                       advantages, cfg)  # fmt: skip
    a = advantages[:, None].expand_as(keep)  # (B, T)
    if loss_agg == "token":
        expected = -a[keep].sum() / keep.sum()
    else:
        expected = -advantages[keep.any(1)].sum() / keep.any(1).sum()
    assert stats["loss"] == pytest.approx(expected.item(), abs=1e-6)
    assert mask == "none" or keep.sum() < rollouts.completion_mask.sum()  # dropped tokens: the counts differ
    assert mask != "s2t" or len(silenced) == (rollouts.completion_mask & ~keep).sum() > 0
    assert stats["clipped"] == 0


def test_each_mini_batch_has_its_own_s2t_mask(tiny):
    model, tok = tiny
    cfg = tiny_cfg(max_new_tokens=20, mini_batches=2, tau_p=0.01)
    rollouts, advantages = rollout_batch(model, tok, cfg)
    model = copy.deepcopy(model)
    old_logp, entropy = stapo.score(model, rollouts, list(range(16)), cfg)
    optimizer = RecordingSGD(model.parameters(), lr=0.0)  # the policy stays put: p and H are the same for both
    stats, silenced = stapo.ppo_update(model, optimizer, rollouts, old_logp, entropy, advantages, cfg)
    expected_tau, expected_rows = [], set()
    for rows in (slice(0, 8), slice(8, 16)):
        mask = torch.zeros_like(rollouts.completion_mask)
        mask[rows] = rollouts.completion_mask[rows]
        s2t = stapo.s2t_select(old_logp, entropy, advantages, mask, cfg.tau_p, cfg.q)
        expected_tau.append(s2t.tau_h)
        expected_rows |= {tuple(x) for x in s2t.spurious.nonzero().tolist()}
    whole = stapo.s2t_select(old_logp, entropy, advantages, rollouts.completion_mask, cfg.tau_p, cfg.q)
    assert None not in expected_tau and whole.tau_h not in expected_tau  # the scopes really differ here
    assert stats["tau_h"] == pytest.approx(expected_tau)
    assert sorted((s["sample"], s["position"]) for s in silenced) == sorted(expected_rows)


def test_ppo_update_clips_the_gradient_norm(tiny):
    model, tok = tiny
    cfg = tiny_cfg(max_new_tokens=20, mask="none", grad_clip=1e-3)
    rollouts, advantages = rollout_batch(model, tok, cfg)
    model = copy.deepcopy(model)
    before = [p.detach().clone() for p in model.parameters()]
    old_logp, entropy = stapo.score(model, rollouts, list(range(16)), cfg)
    stats, _ = stapo.ppo_update(model, torch.optim.SGD(model.parameters(), lr=1.0), rollouts, old_logp, entropy,
                                advantages, cfg)  # fmt: skip
    step = torch.cat([(p.detach() - b).flatten() for p, b in zip(model.parameters(), before, strict=True)])
    assert stats["grad_norm"][0] > 0.01  # the norm before clipping, far above the limit
    assert step.norm().item() == pytest.approx(1e-3, rel=1e-3)  # SGD at lr 1 moves by the clipped gradient


def test_train_builds_warmup_constant_lr_and_decoupled_weight_decay(tmp_path):
    # A random model earns no reward, so every advantage and gradient is 0 and AdamW only decays the
    # weights: w_final = w_0 * prod_t (1 - lr_t * wd), with lr_t the warm-up schedule.
    cfg = tiny_cfg(tmp_path, prompts_per_step=2, group_size=2, max_new_tokens=4, steps=12, warmup_steps=10,
                   lr=1e-2, weight_decay=0.1)  # fmt: skip
    model = stapo.train(cfg)
    lrs = [json.loads(line)["lr"] for line in (tmp_path / "metrics.jsonl").open()]
    assert [lrs[i] for i in (0, 1, 9, 10, 11)] == pytest.approx([1e-3, 2e-3, 1e-2, 1e-2, 1e-2])
    decay = math.prod(1 - lr * 0.1 for lr in lrs)
    initial, _ = stapo.load_policy("tiny", CPU, seed=0)
    for p, p0 in zip(model.parameters(), initial.parameters(), strict=True):
        torch.testing.assert_close(p.detach(), p0 * decay, rtol=1e-5, atol=1e-7)


def test_gradient_checkpointing_gives_the_same_gradients(tiny):
    model, tok = tiny
    cfg = tiny_cfg(max_new_tokens=20, mask="none")
    rollouts, advantages = rollout_batch(model, tok, cfg)
    plain_loss, plain = one_update(model, rollouts, advantages, cfg)
    checkpointed = copy.deepcopy(model)
    stapo.enable_checkpointing(checkpointed)
    checkpointed.train()
    ckpt_loss, ckpt = one_update(checkpointed, rollouts, advantages, cfg)
    assert abs(plain_loss - ckpt_loss) < 1e-6
    assert max((plain[n] - ckpt[n]).abs().max().item() for n in plain) < 1e-6


def test_a_run_turns_gradient_checkpointing_on_with_any_transformers_it_admits(tmp_path, monkeypatch):
    # CI runs this on the floor version too, where the method has only its old name
    models, load = [], stapo.load_model
    monkeypatch.setattr(stapo, "load_model", lambda *args, **kwargs: models.append(load(*args, **kwargs)) or models[0])
    stapo.main([*SMALL, "--steps", "1", "--gradient-checkpointing", "on", "--output-dir", str(tmp_path)])
    assert any(getattr(m, "gradient_checkpointing", False) is True for m in models[0].modules())


def test_later_mini_batches_rescore_p_and_h_under_the_updated_policy(tiny, monkeypatch):
    model, tok = tiny
    cfg = tiny_cfg(max_new_tokens=20, mini_batches=2, tau_p=0.01)
    rollouts, advantages = rollout_batch(model, tok, cfg)
    model = copy.deepcopy(model)
    old_logp, entropy = stapo.score(model, rollouts, list(range(16)), cfg)
    rescored, real_score = [], stapo.score

    def recording_score(m, r, rows, c):
        result = real_score(m, r, rows, c)
        rescored.append((rows, result[0][rows].clone()))
        return result

    monkeypatch.setattr(stapo, "score", recording_score)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    stats, _ = stapo.ppo_update(model, optimizer, rollouts, old_logp, entropy, advantages, cfg)
    assert len(stats["grad_norm"]) == 2  # two optimizer steps
    assert [rows for rows, _ in rescored] == [list(range(8, 16))]  # the first mini-batch reuses old_logp
    moved = (rescored[0][1] - old_logp[8:]).abs()[rollouts.completion_mask[8:]]
    assert moved.max() > 1e-3  # p of mini-batch 2 comes from the policy after mini-batch 1's step


def test_s2t_update_silences_tokens_on_a_random_model(tiny):
    model, tok = tiny
    cfg = tiny_cfg(max_new_tokens=20, tau_p=0.01)  # near-uniform over 259 tokens: p ~ 0.004
    rollouts, advantages = rollout_batch(model, tok, cfg)
    model = copy.deepcopy(model)
    old_logp, entropy = stapo.score(model, rollouts, list(range(16)), cfg)
    stats, silenced = stapo.ppo_update(model, torch.optim.SGD(model.parameters(), lr=0.0), rollouts,
                                       old_logp, entropy, advantages, cfg)  # fmt: skip
    assert len(silenced) > 0 and stats["n_candidates"] > len(silenced)
    assert all(s["A"] > 0 and s["p"] < 0.01 and s["H"] < s["tau_h"] for s in silenced)


def test_bf16_autocast_at_lr_1e6_changes_fp32_weights(tiny):
    model, tok = tiny
    cfg = tiny_cfg(precision="bf16-autocast", lr=1e-6, max_new_tokens=12)
    model = copy.deepcopy(model)
    rollouts, advantages = rollout_batch(model, tok, cfg)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6, weight_decay=0.0)
    old_logp, entropy = stapo.score(model, rollouts, list(range(16)), cfg)
    stapo.ppo_update(model, optimizer, rollouts, old_logp, entropy, advantages, cfg)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    changed = sum(int((p.detach() != before[n]).sum()) for n, p in model.named_parameters())
    assert changed > 0.5 * sum(p.numel() for p in model.parameters())
    # why fp32 master weights: the same step on bf16 weights rounds away almost everywhere
    w = before["model.layers.0.mlp.up_proj.weight"].bfloat16()
    assert ((w + 1e-6) != w).float().mean() < 0.05


# ----------------------------------------------------------------------------------------------
# The reward (stapo.verify) and the benchmark grade (eval.grade): one table of reasons


ANSWER_TABLE = [
    # (completion, gold, the training reward stapo.verify, the benchmark grade eval.grade)  # reason
    (r"so \boxed{42}", "42", True, True),  # plain integer
    (r"\boxed{42}", "43", False, False),  # wrong integer
    (r"\boxed{025}", "25", True, True),  # zero padded (AIME24 gold style)
    (r"\boxed{25}", "025", True, True),  # zero-padded gold
    (r"\boxed{27}", "27.0", True, True),  # AMC23 float gold
    (r"\boxed{27.5}", "27.0", False, False),  # not the same number
    (r"\boxed{1,000}", "1000", True, True),  # thousands separator
    (r"\boxed{1{,}000}", "1000", True, True),  # LaTeX thousands separator
    (r"\boxed{\$18.90}", r"\$18.90", True, True),  # dollars
    (r"\boxed{18.9}", r"\$18.90", True, True),  # dollar sign and trailing zero
    (r"\boxed{90^\circ}", "90", True, True),  # degrees
    (r"\boxed{90}", r"90^{\circ}", True, True),  # degrees in the gold
    (r"\boxed{50\%}", "50", True, True),  # percent sign
    (r"\boxed{\dfrac{1}{2}}", r"\frac{1}{2}", True, True),  # dfrac
    (r"\boxed{\tfrac12}", r"\frac{1}{2}", True, True),  # tfrac without braces
    (r"\boxed{\frac12}", r"\frac{1}{2}", True, True),  # frac shorthand
    (r"\boxed{0.5}", r"\frac{1}{2}", True, True),  # decimal vs fraction
    (r"\boxed{1/2}", r"\frac{1}{2}", True, True),  # slash fraction
    (r"\boxed{-\frac{1}{2}}", "-0.5", True, True),  # negative fraction
    (r"\boxed{\frac{1}{3}}", "0.33", False, False),  # rounding beyond tolerance
    (r"\boxed{0.333333}", r"\frac{1}{3}", True, True),  # within relative tolerance
    (r"\boxed{4.5 \times 10^{33}}", "4.5e33", True, True),  # scientific notation, LaTeX vs Python
    (r"\boxed{4.5e33}", r"4.5\times10^{33}", True, True),  # scientific notation reversed
    (r"\boxed{4.6e33}", "4.5e33", False, False),  # different mantissa
    (r"\boxed{10^{5}}", "100000", True, True),  # power of ten
    (r"\boxed{123456789012}", "123456789013", False, False),  # large integers compare exactly
    (r"\boxed{\text{Evelyn}}", r"\text{Evelyn}", True, True),  # text answer
    (r"\boxed{Evelyn}", r"\text{Evelyn}", True, True),  # text wrapper dropped
    (r"\boxed{\textbf{(C)}}", r"\text{(C)}", True, True),  # multiple choice letter
    (r"\boxed{C}", r"\text{(C)}", False, True),  # bare letter vs (C)
    (r"\boxed{10 \text{ cm}}", "10", True, True),  # unit in \text
    (r"\boxed{10 cm}", "10", True, True),  # unit word
    (r"\boxed{5\text{ cm}^2}", "5", True, True),  # squared unit
    (r"\boxed{\frac{270}7\text{ degrees}}", r"\frac{270}{7}", True, True),  # MATH500 gold with unit
    (r"\boxed{x = 5}", "5", True, True),  # single-symbol left side
    (r"\boxed{5}", "x=5", True, True),  # left side in the gold
    (r"\boxed{\theta = 30}", "30", True, True),  # command as the left side
    (r"\boxed{x+y=5}", "5", False, False),  # not a single symbol: kept
    (
        r"\boxed{\left( 3, \frac{\pi}{2} \right)}",
        r"\left( 3, \frac{\pi}{2} \right)",
        True,
        True,
    ),  # tuple with left/right
    (r"\boxed{(3,\frac{\pi}{2})}", r"(3, \frac{\pi}{2})", True, True),  # tuple spacing
    (r"\boxed{(3,4]}", "(3,4]", True, True),  # half-open interval
    (r"\boxed{(3,4)}", "(3,4]", False, False),  # bracket types must match
    (r"\boxed{[3,4]}", "(3,4)", False, False),  # closed vs open
    (r"\boxed{(2,\infty)}", r"(2,\infty)", True, True),  # infinite interval
    (r"\boxed{(1,2)}", "(2,1)", False, False),  # tuples are ordered
    (r"\boxed{(1.0,2)}", "(1,2)", False, True),  # tuple elements compare as numbers
    (r"\boxed{3, 5, 7}", "3, 5, 7", True, True),  # bare list
    (r"\boxed{7,3,5}", "3, 5, 7", False, True),  # bare lists are unordered
    (r"\boxed{3,5}", "3, 5, 7", False, False),  # missing element
    (r"\boxed{1,-2}", "-2, 1", False, True),  # negative element in a list
    (r"\boxed{\{1,2\}}", r"\{2,1\}", False, True),  # sets are unordered
    (r"\boxed{\sqrt{2}}", r"\sqrt2", False, True),  # sqrt shorthand
    (r"\boxed{2\sqrt{3}}", r"2\sqrt{3}", True, True),  # symbolic expression
    (r"\boxed{2\sqrt{3}}", r"3\sqrt{2}", False, False),  # different expression
    (r"\boxed{\begin{pmatrix} 1 \\ 2 \end{pmatrix}}", r"\begin{pmatrix}1\\2\end{pmatrix}", False, True),  # matrix
    (r"\fbox{12}", "12", True, True),  # fbox
    (r"\boxed 12", "12", True, True),  # boxed without braces
    (r"\boxed{1} then \boxed{2}", "2", True, True),  # the last box is the answer
    (r"\boxed{1} then \boxed{2}", "1", False, False),  # an earlier box is not
    (r"\boxed{1}\boxed{2}", "1,2", False, False),  # two boxes are not one answer
    (r"\boxed{\frac{1}{2}", r"\frac{1}{2}", False, False),  # unbalanced braces
    (r"the answer is 42", "42", False, False),  # no box
    (r"\boxed{}", "", False, False),  # empty prediction and gold
    (r"\boxed{}", "0", False, False),  # empty prediction
    (r"\boxed{5}", "", False, False),  # empty gold never rewards
    (r"\boxed{5}", r"\boxed{", False, False),  # unparsable gold never rewards
    (r"\boxed{5}", r"\boxed{5}", False, True),  # gold wrapped in a box
    (r"\boxed{\frac{1}{2}}", r"\frac{1}{2", False, False),  # a gold with unbalanced braces never rewards
    (r"\boxed{2n-2}", "$2n-2$", True, True),  # OlympiadBench dollar-wrapped gold
    (r"\boxed{(-\infty, 0) \cup\{1\}}", r"$(-\infty, 0) \cup\{1\}$.", True, True),  # gold with trailing period
    (r"\boxed{5.}", "5", True, True),  # trailing period
    (r"\boxed{ 5 }", "5", True, True),  # spaces
    (r"\boxed{\!5\,}", "5", True, True),  # LaTeX spacing commands
    (r"\boxed{-3}", "3", False, False),  # sign matters
    (r"\boxed{0}", "0.0", True, True),  # zero
    (r"\boxed{1e999999}", "1e999999", True, True),  # infinities compare as identical strings only
    (r"\boxed{1e999999}", "2e999999", False, False),  # overflow is not a number
    (r"\boxed{\infty}", r"\infty", True, True),  # infinity symbol
    (r"\boxed{Yes}", "No", False, False),  # different words
    (r"\boxed{0}", "2.88e-19", False, False),  # relative tolerance only: 0 is not a tiny physical constant
    (r"\boxed{2.88 \times 10^{-19}}", "2.88e-19", True, True),  # a tiny constant still equals itself
    # relations: commands are read whole, so \ge never eats the start of \geq and \le never the start of \left
    (r"\boxed{x \ge 5}", r"x \geq 5", False, True),  # \ge and \geq are one relation
    (r"\boxed{x \geq 5}", r"x \leq 5", False, False),  # opposite relations
    (r"\boxed{x \le 5}", r"x \leqslant 5", False, True),  # \leqslant
    (r"\boxed{x \geqq 5}", "x ≥ 5", False, True),  # \geqq and unicode ≥
    (r"\boxed{x \leqq 5}", "x ≤ 5", False, True),  # \leqq and unicode ≤
    (r"\boxed{x \geqslant 5}", "x > 5", False, False),  # >= is not >
    (r"\boxed{x \neq 5}", r"x \ne 5", False, True),  # \ne and \neq
    (r"\boxed{x ≠ 5}", r"x \neq 5", False, True),  # unicode ≠
    (r"\boxed{x \neq 5}", "x = 5", False, False),  # not equal is not equal
    (r"\boxed{x \lt 5}", "x < 5", False, True),  # \lt
    (r"\boxed{x \gt 5}", "x < 5", False, False),  # \gt is not <
    (r"\boxed{5 \le x \le 7}", r"5 \leq x \leq 7", False, True),  # two relations
    (r"\boxed{\left[ 1, 2 \right]}", "[1,2]", True, True),  # \left is not \le followed by ft
    (r"\boxed{x \leftarrow 5}", "x <= ftarrow 5", False, False),  # \leftarrow is one command
    (r"\boxed{\left\{ 1, 2 \right\}}", r"\{2,1\}", False, True),  # \left\{ is a set brace
    # \cfrac, more text wrappers, \quad
    (r"\boxed{\cfrac{1}{2}}", "0.5", True, True),  # cfrac
    (r"\boxed{\cfrac12}", r"\frac{1}{2}", True, True),  # cfrac without braces
    (r"\boxed{\cfrac{1}{3}}", "0.5", False, False),  # cfrac of another value
    (r"\boxed{12\textnormal{ miles}}", "12", True, True),  # unit in \textnormal
    (r"\boxed{12 \textrm{ miles}}", "12", True, True),  # unit in \textrm
    (r"\boxed{12\textnormal{ miles}}", "13", False, False),  # unit dropped, number still compared
    (r"\boxed{\textnormal{Evelyn}}", r"\text{Evelyn}", True, True),  # \textnormal wrapper
    (r"\boxed{12 \quad \text{miles}}", "12", True, True),  # \quad is a space
    (r"\boxed{x = 3 \qquad}", "3", True, True),  # \qquad is a space
    # a parenthesised single value is the value; two or more values keep their brackets
    (r"\boxed{(5)}", "5", False, True),  # parentheses around one value
    (r"\boxed{5}", "(5)", False, True),  # parentheses in the gold
    (r"\boxed{\left( \frac{1}{3} \right)}", r"\frac{1}{3}", False, True),  # with \left( and \right)
    (r"\boxed{((5))}", "5", False, True),  # doubled parentheses
    (r"\boxed{(-2)}", "-2", False, True),  # negative value in parentheses
    (r"\boxed{(5)}", "6", False, False),  # another value
    (r"\boxed{(5)}", "(5,6)", False, False),  # one value is not a pair
    (r"\boxed{(5,6)}", "5", False, False),  # a pair is not one value
    (r"\boxed{(3,4)}", "3,4", False, False),  # a tuple is not a bare list
    (r"\boxed{(1)+(2)}", "1)+(2", False, False),  # (1)+(2) is not one parenthesised value
    (r"\boxed{(C)}", r"\text{(D)}", False, False),  # multiple choice: another letter
    # left sides that only name the answer: a symbol, f(x), g(2), a tuple of symbols, x \in
    (r"\boxed{(p,q)=(3,2)}", "(3,2)", False, True),  # tuple of symbols as the left side
    (r"\boxed{(p,q)=(3,2)}", "(2,3)", False, False),  # still an ordered pair
    (r"\boxed{f(x)=2}", "2", False, True),  # function value
    (r"\boxed{f(x)=2}", "3", False, False),  # function value, another number
    (r"\boxed{5}", "g(2) = 5", False, True),  # function at a number, in the gold
    (r"\boxed{a_{n} = 2n}", "2n", False, True),  # subscripted symbol
    (r"\boxed{x_12 = 5}", "5", True, True),  # subscript without braces
    (r"\boxed{\angle ABC = 30^\circ}", "30", False, True),  # an angle's name
    (r"\boxed{x \in [-2,7]}", "[-2,7]", False, True),  # membership in an interval
    (r"\boxed{x \in [-2,7]}", "(-2,7)", False, False),  # membership, other bracket types
    (r"\boxed{x \in (1, \infty)}", r"(1,\infty)", False, True),  # \in is not the start of \infty
    (r"\boxed{y = 2x+3}", "y=2x+3", True, True),  # an equation vs the same equation
    (r"\boxed{y = 2x+3}", "y=2x+4", False, False),  # another equation
    (r"\boxed{x(x+1)=6}", "6", False, False),  # a product is not a name
    (r"\boxed{2x=6}", "6", False, False),  # 2x is not a name
    (r"\boxed{x = 1, y = 2}", "1,2", False, False),  # two equations: no left side dropped
    # "and" separates list items
    (r"\boxed{6 \text{ and } 8}", "6,8", False, True),  # \text{ and }
    (r"\boxed{6 and 8}", "6, 8", False, True),  # bare and
    (r"\boxed{6, 8, \text{and } 9}", "6,8,9", False, True),  # serial comma before and
    (r"\boxed{8 \text{ and } 6}", "6,8", False, True),  # lists stay unordered
    (r"\boxed{6 and 8}", "6,9", False, False),  # another list
    (r"\boxed{6 and 8}", "68", False, False),  # and is not nothing
    (r"\boxed{\text{Candy}}", "C,y", False, False),  # and inside a word
    # thousands separators: only d,ddd written without a space, never after a leading 0
    (r"\boxed{32, 349}", "32349", False, False),  # comma and space: a list of two numbers
    (r"\boxed{32,\! 349}", "32349", True, True),  # LaTeX thousands: comma, thin space, then a space
    (r"\boxed{11,\! 111,\! 111,\! 100}", "11111111100", True, True),  # the same, several groups
    (r"\boxed{12, 345}", "12345", False, False),  # comma and space: a list
    (r"\boxed{32,349}", "32349", True, True),  # no space: thousands separator
    (r"\boxed{1,234,567}", "1234567", True, True),  # two separators
    (r"\boxed{-1,234.5}", "-1234.5", True, True),  # sign and decimals
    (r"\boxed{\$32,\!348}", "32348", True, True),  # MATH500 gold style
    (r"\boxed{x = 1,000}", "1000", True, True),  # after a left side
    (r"\boxed{0,111}", "111", False, False),  # a leading 0 is a list item
    (r"\boxed{111}", "0,111", False, False),  # same, in the gold
    (r"\boxed{0,111}", "111,0", False, True),  # the list 0, 111 in any order
    (r"\boxed{1,00}", "100", False, False),  # groups of three digits only
    (r"\boxed{12,34,567}", "1234567", False, False),  # every group has three digits
]


@pytest.mark.parametrize(("completion", "gold", "reward", "grade"), ANSWER_TABLE)
def test_the_reward_and_the_benchmark_grade(completion, gold, reward, grade):
    assert stapo.verify(completion, gold) is reward
    assert ev.grade(completion, gold) is grade


@pytest.mark.parametrize(
    "text",
    [
        "{" * 50_000 + "\\boxed{" + "{" * 50_000,
        "\\boxed{1}" * 20_000,
        "\\boxed{" + "x" * 200_000 + "}",
        "".join(random.Random(0).choice("\\{}()[]$^_0123456789abc ,.=") for _ in range(200_000)),
        "\\boxed{1e999999}",
        "\\boxed{" + "2^" * 5000 + "2}",
        "\\boxed{10^{" + "9" * 5000 + "}}",
        "\\boxed{\x00\x00}\x00",
        "\\boxed{" + "(" * 3000 + ")" * 3000 + "}",
        "\\boxed{" + ",".join(["1"] * 1000) + "}",
        "\\boxed{" + "1" * 1999 + "}",
        "\\boxed{x" + "_a" * 990 + "+1=2}",  # a left side that is almost a name
        "\\boxed{f(" + "x, " * 660 + "=1}",  # almost a function application
        "\\boxed{" + " and " * 399 + "}",  # list separators and spaces only
    ],
)
def test_the_reward_and_the_grade_are_total_and_fast_on_hostile_input(text):
    for gold in (text, "42", "(1,2]", "1, 2, 3"):
        for judge in (stapo.verify, ev.grade):
            start = time.process_time()  # CPU time of this process: what the verifier costs, whatever the load
            assert judge(text, gold) in (True, False)
            assert time.process_time() - start < 0.05


# ----------------------------------------------------------------------------------------------
# Data


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        ({"problem": "1+1?", "answer": "2"}, {"problem": "1+1?", "answer": "2"}),  # MATH style
        ({"question": "1+1?", "answer": 2.0}, {"problem": "1+1?", "answer": "2"}),  # a float gold
        ({"problem": "q", "answer": 0}, {"problem": "q", "answer": "0"}),  # 0 is an answer
        ({"prompt": "q", "solution": "34"}, {"problem": "q", "answer": "34"}),  # open-r1 DAPO copy: a bare gold
        (
            {"prompt": [{"role": "user", "content": stapo.DAPO_PREFIX + "Find x." + stapo.DAPO_SUFFIX}],
             "reward_model": {"ground_truth": "12", "style": "rule"}},
            {"problem": "Find x.", "answer": "12"},
        ),  # Hub DAPO: chat list, wrapper stripped, gold in reward_model
        ({"problem": "q", "answer": None}, "the gold answer is empty"),  # no answer: skipped
        ({"problem": "q", "answer": {"value": 3}}, "the gold answer is a dict"),  # a dict is no gold answer
        ({"problem": "q", "answer": True}, "the gold answer is a bool"),  # nor is a boolean
        ({"prompt": [{"role": "system", "content": "s"}], "answer": "1"}, "no problem text (or a chat without a "
         "user turn)"),  # a chat without a user turn
        ({"problem": "q", "answer": "  "}, "the gold answer is empty"),  # a blank answer: skipped
    ],
)  # fmt: skip
def test_parse_row(row, expected):
    assert stapo.parse_row(row) == expected


def test_parse_row_with_explicit_keys():
    assert stapo.parse_row({"q": "x?", "gold": 3}, "q", "gold") == {"problem": "x?", "answer": "3"}


def load(cfg, tok):
    with stapo.loading("--dataset", cfg.dataset, "dataset"):  # as train() loads it
        return stapo.load_problems(cfg, tok)


def test_load_local_jsonl_counts_skipped_rows(tiny, tmp_path, capsys):
    path = tmp_path / "d.jsonl"
    rows = [{"problem": "a", "answer": "1"}, {"problem": "b", "answer": None}, {"problem": "a", "answer": "1"}]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    problems = load(tiny_cfg(dataset=str(path)), tiny[1])
    assert [(p["problem"], p["answer"]) for p in problems] == [("a", "1")]  # unique by text
    assert "1 unusable rows (first: row 2: the gold answer is empty)" in capsys.readouterr().out


@pytest.mark.parametrize("suffix", [".json", ".parquet"])
def test_json_and_parquet_files_are_read_with_datasets(tiny, tmp_path, suffix):
    import datasets

    rows = datasets.Dataset.from_list([{"prompt": [{"role": "user", "content": "x?"}],
                                        "reward_model": {"ground_truth": "3"}}] * 2)  # fmt: skip
    path = tmp_path / f"d{suffix}"
    rows.to_parquet(path) if suffix == ".parquet" else path.write_text(json.dumps(rows.to_list()))
    assert [(p["problem"], p["answer"]) for p in load(tiny_cfg(dataset=str(path)), tiny[1])] == [("x?", "3")]


def test_unrecognised_columns_fail_with_the_columns_and_flags(tiny, tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"text": "a", "label": "1"}) + "\n")
    with pytest.raises(SystemExit, match=r"no usable row .*\['label', 'text'\].*--problem-key and --answer-key"):
        load(tiny_cfg(dataset=str(path)), tiny[1])


def test_prompt_formats(tiny):
    _, tok = tiny
    chat = stapo.build_prompt("What is 1+1?", tok, "chat")
    plain = stapo.build_prompt("What is 1+1?", tok, "plain")
    assert chat.startswith("<|im_start|>user\nWhat is 1+1?") and chat.endswith("<|im_start|>assistant\n")
    assert plain.startswith("What is 1+1?") and stapo.INSTRUCTION in plain and "<|im_start|>" not in plain


def test_data_order_is_a_permutation_per_epoch():
    problems = list(range(10))
    cfg = stapo.Config(prompts_per_step=2, seed=3)
    first_epoch = [x for step in range(5) for x in stapo.pick_problems(problems, step, cfg)]
    assert sorted(first_epoch) == problems
    assert stapo.pick_problems(problems, 7, cfg) == stapo.pick_problems(problems, 7, cfg)


# ----------------------------------------------------------------------------------------------
# End to end


# python -c WITHOUT_DATASETS script.py args: the script on a machine where `import datasets` fails
WITHOUT_DATASETS = ("import runpy, sys; sys.modules['datasets'] = None; sys.argv.pop(0); "
                    "runpy.run_path(sys.argv[0], run_name='__main__')")  # fmt: skip


def run_cli(args, cwd=HERE, timeout=120, python=()):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, *python, "stapo.py", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=env)  # fmt: skip


@pytest.mark.slow
def test_one_step_end_to_end_then_resume_equals_uninterrupted(tmp_path):
    from transformers import AutoModelForCausalLM

    common = ["--model", "tiny", "--dataset", "toy", "--prompts-per-step", "4", "--group-size", "4",
              "--max-new-tokens", "16", "--lr", "1e-3", "--tau-p", "0.01"]  # fmt: skip
    straight = run_cli([*common, "--steps", "2", "--output-dir", str(tmp_path / "a")])
    assert straight.returncode == 0, straight.stderr
    first = run_cli([*common, "--steps", "1", "--output-dir", str(tmp_path / "b")])
    assert first.returncode == 0, first.stderr
    assert "step    1/1 | reward" in first.stdout

    ckpt = tmp_path / "b" / "step-000001"
    assert (ckpt / "model.safetensors").exists() and (ckpt / "trainer_state.pt").exists()
    loaded = AutoModelForCausalLM.from_pretrained(ckpt)
    initial, _ = stapo.load_policy("tiny", CPU, seed=0)
    assert any(not torch.equal(p, q) for p, q in zip(loaded.parameters(), initial.parameters(), strict=True))
    metrics = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").open()]
    keys = {"reward", "frac_zero_std", "len_mean", "truncated_frac", "entropy", "n_candidates", "n_spurious", "lr",
            "spurious_frac", "tau_h", "clip_frac", "loss", "grad_norm",
            "generation_s", "scoring_s", "update_s"}  # fmt: skip
    assert len(metrics) == 1 and keys <= metrics[0].keys()
    assert (tmp_path / "b" / "samples.jsonl").read_text().count("\n") == 4
    for record in map(json.loads, (tmp_path / "b" / "spurious.jsonl").open()):
        assert {"step", "token", "left", "right", "p", "H", "A", "tau_h"} <= record.keys()

    with (tmp_path / "b" / "metrics.jsonl").open("a") as f:  # a step the stop lost, after the checkpoint
        f.write(json.dumps({**metrics[0], "step": 2}) + "\n")
    resumed = run_cli(["--resume", str(ckpt), "--steps", "2"])  # output dir and flags from the checkpoint
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout
    a = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").open()]
    b = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").open()]
    assert len(b) == 2
    for key in ("reward", "len_mean", "n_spurious", "loss", "grad_norm"):
        assert b[1][key] == pytest.approx(a[1][key], rel=1e-5, abs=1e-7), key
    final_a = AutoModelForCausalLM.from_pretrained(tmp_path / "a" / "step-000002")
    final_b = AutoModelForCausalLM.from_pretrained(tmp_path / "b" / "step-000002")
    for p, q in zip(final_a.parameters(), final_b.parameters(), strict=True):
        assert torch.allclose(p, q, atol=1e-6)


@pytest.mark.slow  # a subprocess: imports torch and transformers again
def test_cli_smoke_run_from_the_readme(tmp_path):
    args = ["--model", "tiny", "--dataset", "toy", "--steps", "3", "--output-dir", str(tmp_path)]
    result = run_cli(args, python=("-c", WITHOUT_DATASETS))  # the toy data needs no `datasets`
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("| reward") == 3 and (tmp_path / "step-000003" / "model.safetensors").exists()
    # quiet: the config is a file, one line says where; no progress bar of a one-shard save
    assert f"config: {tmp_path / 'stapo_config.json'}" in result.stdout and "{" not in result.stdout
    assert "shards" not in result.stdout + result.stderr and len(result.stdout.splitlines()) <= 8
    # the generate batch is fixed before loading (afterwards the weights hold memory) and recorded for a resume
    assert json.loads((tmp_path / "stapo_config.json").read_text())["generate_batch"] == 64


def stop_in(phase: str, step: int, monkeypatch):
    """Ask the run to stop (as Ctrl-C does) while `phase` of `step` runs: inside generate, or inside the scoring
    pass that comes before the update's micro-batches."""
    name = {"generation": "generate", "update": "score"}[phase]
    real, calls = getattr(stapo, name), []

    def asking(*args, **kwargs):
        calls.append(1)
        if len(calls) == step:
            stapo.STOP.append(signal.SIGINT)
        return real(*args, **kwargs)

    monkeypatch.setattr(stapo, name, asking)


@pytest.mark.parametrize("phase", ["generation", "update"])
def test_a_stop_drops_the_step_under_way_saves_the_last_and_resumes_exactly(phase, tmp_path, monkeypatch, capsys):
    from safetensors.torch import load_file

    flags = [*SMALL, "--tau-p", "0.5", "--lr", "1e-2", "--steps", "3", "--save-every", "100"]
    stapo.main([*flags, "--output-dir", str(tmp_path / "straight")])
    stop_in(phase, 2, monkeypatch)
    stapo.main([*flags, "--output-dir", str(tmp_path / "stopped")])
    monkeypatch.undo()
    assert steps_of(tmp_path / "stopped" / "metrics.jsonl") == [1]  # step 2 was dropped whole
    assert [p.name for p in (tmp_path / "stopped").glob("step-*")] == ["step-000001"]
    resume = f"stopped; resume with: python stapo.py --resume {tmp_path / 'stopped' / 'step-000001'}"
    assert resume in capsys.readouterr().out
    stapo.main(["--resume", str(tmp_path / "stopped" / "step-000001")])
    a, b = (read_metrics(tmp_path / run / "metrics.jsonl") for run in ("straight", "stopped"))
    assert [m["step"] for m in b] == [1, 2, 3]
    for key in ("reward", "len_mean", "entropy", "n_spurious", "loss", "grad_norm"):
        assert [m[key] for m in b] == pytest.approx([m[key] for m in a], rel=1e-5, abs=1e-7), key
    sa, sb = (read_metrics(tmp_path / run / "samples.jsonl") for run in ("straight", "stopped"))
    assert [r["completion"] for r in sb] == [r["completion"] for r in sa]  # the random state of step 2's start
    wa, wb = (load_file(tmp_path / run / "step-000003" / "model.safetensors") for run in ("straight", "stopped"))
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize(
    ("phase", "patched", "advice"),
    [("generation", "generate", "try --generate-batch 2"), ("update", "ppo_update", "try --micro-batch-tokens 8192")],
)
def test_out_of_memory_is_one_line_and_the_last_checkpoint_stays(phase, patched, advice, tmp_path, monkeypatch):
    real, calls = getattr(stapo, patched), []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(*args, **kwargs)

    monkeypatch.setattr(stapo, patched, failing)
    with pytest.raises(SystemExit) as exit_info:
        stapo.main([*SMALL, "--steps", "3", "--save-every", "1", "--generate-batch", "4",
                    "--output-dir", str(tmp_path)])  # fmt: skip
    message = str(exit_info.value.code)
    assert message.startswith(f"out of memory in {phase}: ") and advice in message and "\n" not in message
    assert ("GB); try" in message) == (phase == "generation")  # what the plan gave generation, in GB
    assert f"The last checkpoint, {tmp_path / 'step-000001'}, is intact" in message and "python plan.py" in message
    assert [p.name for p in tmp_path.glob("step-*")] == ["step-000001"] and not list(tmp_path.glob(".tmp-*"))
    stapo.load_policy(str(tmp_path / "step-000001"), CPU)  # loads


def start(args: list[str], launcher: list[str] | None = None, script=("stapo.py",)) -> tuple[subprocess.Popen, list]:
    """stapo.py in a subprocess, and the lines of its stdout as they come."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([*(launcher or [sys.executable]), *script, *args], cwd=HERE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)  # fmt: skip
    lines = []
    proc.reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    proc.reader.start()
    return proc, lines


def finish(proc: subprocess.Popen, seconds: float = 120) -> str:
    """Waits for the process and its stdout; returns its stderr."""
    proc.wait(timeout=seconds)
    proc.reader.join(timeout=10)
    return proc.stderr.read()


def wait_for(condition, seconds: float = 120):
    deadline = time.time() + seconds
    while not condition():
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


@pytest.mark.slow  # subprocesses: each imports torch and transformers again
def test_ctrl_c_at_each_stage_ends_in_one_line(tmp_path):
    # while torch and transformers are imported (seconds; if they are already in, the model loads): one line
    proc, out = start(["--model", "tiny-sft", "--steps", "2", "--output-dir", str(tmp_path / "0")])
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    err = finish(proc)
    assert proc.returncode == 130 and len(err.strip().splitlines()) == 1 and err.startswith("stopped"), err
    # while tiny-sft is taught the answer format (its model loads for ~15 s): at once, one line, nothing saved
    proc, out = start(["--model", "tiny-sft", "--steps", "2", "--output-dir", str(tmp_path / "a")])
    wait_for(lambda: any(line.startswith("data:") for line in out))  # the data is read: the model is loading
    proc.send_signal(signal.SIGINT)
    err = finish(proc)
    assert proc.returncode == 130 and err.strip() == "stopped at once; the last complete checkpoint is none", err
    # in the middle of a step: the step is dropped, the last completed one saved, the command to resume printed
    args = ["--model", "tiny", "--steps", "1000", "--prompts-per-step", "8", "--group-size", "8", "--max-new-tokens",
            "64", "--save-every", "1000"]  # fmt: skip
    proc, out = start([*args, "--output-dir", str(tmp_path / "b")])
    wait_for(lambda: any(line.startswith("step    1/") for line in out))
    proc.send_signal(signal.SIGINT)
    err = finish(proc)
    done = len(steps_of(tmp_path / "b" / "metrics.jsonl"))
    ckpt = tmp_path / "b" / f"step-{done:06d}"
    assert proc.returncode == 0 and "Traceback" not in err and (ckpt / "model.safetensors").exists()
    assert out[-1].strip() == f"stopped; resume with: python stapo.py --resume {ckpt}"
    # a second Ctrl-C while the checkpoint is written (torch.save made slow): at once, one line naming the last
    # complete checkpoint, and the half-written folder removed
    slow_save = ("import time, torch, stapo; save = torch.save; "
                 "torch.save = lambda *a, **k: time.sleep(3) or save(*a, **k); stapo.main()")  # fmt: skip
    proc, out = start([*args, "--output-dir", str(tmp_path / "c")], script=("-c", slow_save))
    wait_for(lambda: any(line.startswith("step    1/") for line in out))
    proc.send_signal(signal.SIGINT)
    wait_for(lambda: list((tmp_path / "c").glob(".tmp-step-*")))
    proc.send_signal(signal.SIGINT)
    err = finish(proc)
    assert proc.returncode == 130 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1] == "stopped at once; the last complete checkpoint is none"
    assert not list((tmp_path / "c").glob(".tmp-*")) and not list((tmp_path / "c").glob("step-*"))


def readme_method_commands() -> dict[str, list[str]]:
    """The README's one-line command of each method the paper compares: {method: flags}."""
    commands = {}
    section = (HERE / "README.md").read_text().split("### STAPO and the paper's three baselines")[1].split("###")[0]
    for line in section.splitlines():
        if line.startswith("python stapo.py --model Qwen/Qwen3-1.7B-Base"):
            command, method = line.split("#")
            commands[method.strip().split(" ")[0]] = command.split()[4:]
    return commands


METHODS = {"STAPO": ("s2t", "token", 0.28), "JustRL": ("none", "token", 0.28),
           "20-Entropy": ("high-entropy", "token", 0.28), "GRPO": ("none", "sequence", 0.2)}  # fmt: skip


def test_readme_runs_the_four_methods(tmp_path):
    commands = readme_method_commands()
    assert sorted(commands) == sorted(METHODS)
    small = ["--model", "tiny", "--dataset", "toy", "--steps", "1", "--prompts-per-step", "2", "--group-size", "2",
             "--max-new-tokens", "4"]  # fmt: skip
    for method, flags in commands.items():
        stapo.main([*flags, *small, "--output-dir", str(tmp_path / method)])
        cfg = json.loads((tmp_path / method / "stapo_config.json").read_text())
        assert (tmp_path / method / "metrics.jsonl").read_text().count("\n") == 1
        assert (cfg["mask"], cfg["loss_agg"], cfg["eps_high"]) == METHODS[method]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--save-every", "0"], "--save-every 0: must be at least 1"),
        (["--mini-batches", "0"], "--mini-batches 0: must be at least 1"),
        (["--prompts-per-step", "0"], "--prompts-per-step 0: must be at least 1"),
        (["--prompts-per-step", "6", "--mini-batches", "4"], "must be divisible by --mini-batches 4"),
        (["--q", "2"], "--q 2.0: must be a quantile in [0, 1]"),
        (["--tau-p", "5"], "--tau-p 5.0: must be a probability in (0, 1)"),
        (["--steps", "0"], "--steps 0: must be at least 1"),
        (["--precision", "bf16"], "--precision: invalid choice: 'bf16'"),
        (["--mask", "S2T"], "--mask: invalid choice: 'S2T'"),
        (["--dual-clip", "0.5"], "--dual-clip 0.5: must be 0 (off) or above 1"),
        (["--top-p", "0"], "--top-p 0.0: must be in (0, 1]"),
        (["--device", "gpu"], "--device gpu: must be auto, cpu, cuda or cuda:N"),
        (["--group-size", "1"], "--group-size 1: must be at least 2"),
        (["--gpu-memory-gb", "inf"], "--gpu-memory-gb inf: must be a finite number"),
        (["--generate-batch", "-1"], "--generate-batch -1: must be at least 0"),
        (["--lr=-1e-6"], "--lr -1e-06: must be above 0"),
        (["--temperature", "nan"], "--temperature nan: must be"),
    ],
)  # fmt: skip
def test_bad_flags_are_named_before_anything_loads(flags, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        stapo.parse_args(["--model", "tiny", *flags])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="the machine has CUDA")
def test_a_device_the_machine_lacks_is_named(capsys):
    with pytest.raises(SystemExit):
        stapo.parse_args(["--model", "tiny", "--device", "cuda"])
    assert "--device cuda: this machine has 0 CUDA devices" in capsys.readouterr().err


def test_a_tracker_that_is_not_installed_is_named_before_anything_loads(monkeypatch, capsys):
    monkeypatch.setattr(stapo.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(SystemExit):
        stapo.parse_args(["--model", "tiny", "--report-to", "wandb"])
    assert "--report-to wandb needs the wandb package: pip install wandb" in capsys.readouterr().err


def test_help_lists_the_allowed_values_of_every_choice_flag(capsys):
    with pytest.raises(SystemExit):
        stapo.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for choices in ("{s2t,none,high-entropy}", "{token,sequence}", "{auto,fp32,bf16-autocast}", "{chat,plain}"):
        assert choices in text


def test_unknown_dataset_file_fails_clearly(tmp_path):
    with pytest.raises(
        SystemExit, match="missing.jsonl: no local file or folder of that name here, and it is not a Hub id"
    ):
        stapo.main(
            ["--model", "tiny", "--dataset", str(tmp_path / "missing.jsonl"), "--output-dir", str(tmp_path / "o")]
        )


# ----------------------------------------------------------------------------------------------
# Nothing lost, every bad input named

SMALL = ["--model", "tiny", "--dataset", "toy", "--prompts-per-step", "2", "--group-size", "2",
         "--max-new-tokens", "4"]  # fmt: skip


def steps_of(path: Path) -> list[int]:
    return [json.loads(line)["step"] for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def run_of_four_steps(tmp_path_factory):
    """A tiny run of 4 steps with checkpoints at 2 and 4 (run once; tests copy it)."""
    out = tmp_path_factory.mktemp("run4") / "run"
    stapo.main([*SMALL, "--steps", "4", "--save-every", "2", "--output-dir", str(out)])
    return out


@pytest.fixture
def run4(run_of_four_steps, tmp_path):
    shutil.copytree(run_of_four_steps, tmp_path / "run")
    return tmp_path / "run"


def test_a_second_run_into_the_same_folder_is_refused(run4):
    before = (run4 / "metrics.jsonl").read_bytes()
    with pytest.raises(SystemExit, match="already holds a run; continue it with --resume"):
        stapo.main([*SMALL, "--steps", "2", "--output-dir", str(run4)])
    assert (run4 / "metrics.jsonl").read_bytes() == before


def test_resuming_an_earlier_checkpoint_in_place_is_refused_and_a_branch_keeps_the_original(run4, tmp_path):
    original = {p.name: p.read_bytes() for p in run4.glob("*.jsonl")}
    with pytest.raises(SystemExit, match="has a later checkpoint, step-000004.*--output-dir NEW_FOLDER"):
        stapo.main(["--resume", str(run4 / "step-000002"), "--steps", "4"])
    branch = tmp_path / "branch"
    stapo.main(["--resume", str(run4 / "step-000002"), "--steps", "3", "--lr", "1e-3", "--output-dir", str(branch)])
    assert steps_of(branch / "metrics.jsonl") == [3]  # its own history: the parent's stays in the parent's folder
    config = json.loads((branch / "stapo_config.json").read_text())
    assert config["branched_from"] == str((run4 / "step-000002").resolve()) and config["lr"] == 1e-3
    assert {p.name: p.read_bytes() for p in run4.glob("*.jsonl")} == original  # nothing of the parent touched
    assert (run4 / "step-000004" / "trainer_state.pt").exists()


def test_resume_sets_aside_later_records_and_a_torn_line(run4, capsys):
    # the run died during step 4's append after its checkpoint at 2... and left a torn line
    (run4 / "step-000004").rename(run4 / "lost-step-4")
    with (run4 / "metrics.jsonl").open("a") as f:
        f.write('{"step": 5, "rew')
    stapo.main(["--resume", str(run4 / "step-000002"), "--steps", "3"])
    assert steps_of(run4 / "metrics.jsonl") == [1, 2, 3]
    assert steps_of(run4 / "metrics.after-step-000002.jsonl") == [3, 4]  # set aside, not deleted
    assert "line 5 is cut short" in capsys.readouterr().err


def test_a_kill_while_trimming_leaves_the_records_intact(run4, monkeypatch):
    (run4 / "step-000004").rename(run4 / "lost-step-4")
    before = (run4 / "metrics.jsonl").read_bytes()

    def killed(*args):
        raise KeyboardInterrupt  # the process dies between writing the new file and renaming it

    monkeypatch.setattr(stapo.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        stapo.open_run_folder(stapo.parse_args(["--resume", str(run4 / "step-000002"), "--steps", "4"]), True)
    assert (run4 / "metrics.jsonl").read_bytes() == before


def test_resume_applies_lr_and_weight_decay_and_refuses_another_model(run4, capsys):
    with pytest.raises(SystemExit):
        stapo.parse_args(["--resume", str(run4 / "step-000004"), "--model", "Qwen/Qwen3-1.7B-Base"])
    assert "holds weights trained from tiny" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        stapo.parse_args(["--resume", str(run4 / "step-000004"), "--steps", "4"])
    assert "is at step 4 already, and --steps 4 counts all" in capsys.readouterr().err
    stapo.main(["--resume", str(run4 / "step-000004"), "--steps", "5", "--lr", "0.05", "--weight-decay", "0.5"])
    last = json.loads((run4 / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["step"] == 5 and last["lr"] == pytest.approx(0.05 * 5 / 10)  # warm-up step 5 of 10 at the new lr
    optimizer = torch.load(run4 / "step-000005" / "optimizer.pt", weights_only=True)
    assert optimizer["param_groups"][0]["weight_decay"] == 0.5
    assert json.loads((run4 / "stapo_config.json").read_text())["lr"] == 0.05


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", r"no usable row \(empty\)"),
        (b'{"problem": "a", "answer": "1"}\n{"problem": "b", "ans\n', "line 2: not a JSON object"),
        (b'{"problem": "caf\xe9", "answer": "1"}\n', "line 1: not a JSON object .*utf-8"),
        (b'[1, 2]\n', r"line 1: not a JSON object \(a JSON list\)"),
        (b'{"prompt": [{"role": "system", "content": "x"}], "answer": "1"}\n', r"no usable row \(row 1: no problem"),
    ],
)  # fmt: skip
def test_bad_data_files_give_one_line_naming_file_and_line(tiny, tmp_path, content, message):
    path = tmp_path / "data.jsonl"
    path.write_bytes(content)
    with pytest.raises(SystemExit, match=message) as exit_info:
        load(tiny_cfg(dataset=str(path)), tiny[1])
    assert str(path) in str(exit_info.value.code)


def test_max_prompt_tokens_that_fits_no_problem_is_named(tiny):
    _, tok = tiny
    with pytest.raises(SystemExit, match=r"--max-prompt-tokens 5: no prompt fits \(the shortest has \d+ tokens\)"):
        stapo.load_problems(tiny_cfg(max_prompt_tokens=5), tok)


def test_a_folder_whose_run_stopped_before_any_checkpoint_is_named(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "stapo_config.json").write_text("{}")
    with pytest.raises(SystemExit, match=r"stopped before its first checkpoint \(nothing to resume\)"):
        stapo.main([*SMALL, "--steps", "1", "--output-dir", str(tmp_path / "run")])


def test_odd_model_data_and_checkpoint_folders_are_named(run4, tmp_path, capsys):
    with pytest.raises(SystemExit, match=r"a run folder: pass one of its checkpoints, e.g. .*step-000004"):
        stapo.main(["--model", str(run4), "--output-dir", str(tmp_path / "out")])
    (tmp_path / "models" / "Qwen3-1.7B-Base").mkdir(parents=True)  # a download that never happened
    with pytest.raises(SystemExit, match=r"Base: a folder without a config.json, so no model folder"):
        stapo.main(["--model", str(tmp_path / "models" / "Qwen3-1.7B-Base"), "--output-dir", str(tmp_path / "out")])
    (tmp_path / "data.csv").write_text("problem,answer\n")
    with pytest.raises(SystemExit, match="local files are .jsonl, .json or .parquet"):
        load(tiny_cfg(dataset=str(tmp_path / "data.csv")), None)
    shutil.copytree(run4 / "step-000004", tmp_path / "best")
    with pytest.raises(SystemExit):
        stapo.parse_args(["--resume", str(tmp_path / "best"), "--steps", "9"])
    assert "not a checkpoint of this trainer (a step-N folder with a trainer_state.pt" in capsys.readouterr().err
    (run4 / "step-000004" / "stapo_config.json").write_text("[1, 2]")
    with pytest.raises(SystemExit):
        stapo.parse_args(["--resume", str(run4 / "step-000004"), "--steps", "9"])
    assert "readable stapo_config.json" in capsys.readouterr().err


def test_damaged_checkpoint_files_give_one_line(run4, capsys):
    (run4 / "step-000004" / "trainer_state.pt").write_bytes(b"not a zip file")
    with pytest.raises(SystemExit) as exit_info:
        stapo.main(["--resume", str(run4 / "step-000004"), "--steps", "5"])
    message = str(exit_info.value.code)
    assert "step-000004: not a readable trainer state" in message and "weights_only" not in message
    (run4 / "step-000002" / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(SystemExit, match=r"--model .*step-000002: SafetensorError"):
        stapo.load_policy(str(run4 / "step-000002"), CPU)


def test_a_full_disk_while_saving_names_the_last_good_checkpoint(run4, tmp_path, monkeypatch, tiny):
    model, tok = tiny
    cfg = tiny_cfg(output_dir=str(run4))
    optimizer, scheduler = stapo.build_optimizer(model, cfg)

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(stapo.torch, "save", disk_full)
    with pytest.raises(SystemExit) as exit_info:
        stapo.save_checkpoint(model, tok, optimizer, scheduler, cfg, 6, stapo.rng_states())
    message = str(exit_info.value.code)
    assert "No space left on device" in message and message.endswith(f"last good checkpoint is {run4 / 'step-000004'}")
    assert not list(run4.glob(".tmp-*")) and not (run4 / "step-000006").exists()


@pytest.mark.parametrize("folder", ["/no/such/model", "./runs/nothing", "runs/stapo/step-000001"])
def test_a_missing_local_folder_is_named_at_once(folder, tmp_path):
    start = time.time()  # a path is not a Hub id: no request, no retries
    with pytest.raises(SystemExit, match=f"--model {folder}: no local file or folder of that name here, and it is "
                       "not a Hub id either"):  # fmt: skip
        stapo.main(["--model", folder, "--output-dir", str(tmp_path / "out")])
    assert time.time() - start < 5 and not (tmp_path / "out").exists()


def test_errors_are_one_line_without_the_usage_block(run4, capsys):
    for flags in (["--q", "2"], ["--mask", "nonsense"], ["--resume", str(run4 / "step-000004"), "--steps", "3"]):
        with pytest.raises(SystemExit):
            stapo.parse_args(["--model", "tiny", *flags])
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("stapo.py: error: ") and "usage" not in err, err
    assert "counts all the steps of the run" in err and "step-000004: is at step 4" in err
    with pytest.raises(SystemExit, match=f"--resume {run4 / 'step-000004'}"):  # the real name, not step-NNNNNN
        stapo.check_run_folder(stapo.Config(output_dir=str(run4)))


@pytest.mark.slow  # a subprocess: imports torch and transformers again
@pytest.mark.parametrize("offline", ["HF_HUB_OFFLINE", "no network"])
def test_a_name_found_nowhere_is_one_line_in_seconds(tmp_path, offline):
    """Not a local path, and the Hub cannot be asked (HF_HUB_OFFLINE, or no network as on this machine): one line
    that says both, after one request at most (no retries), and the local cache was tried."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"} if offline == "HF_HUB_OFFLINE" else {**os.environ}
    env |= {"HF_ENDPOINT": "http://127.0.0.1:9"} if offline == "no network" else {}  # a port nothing listens on
    start, cases = time.time(), {"--model": "models/Qwen3-1.7B-Base", "--dataset": "train.csv"}
    procs = {flag: subprocess.Popen([sys.executable, "stapo.py", "--model", "tiny", flag, name, "--output-dir",
                                     str(tmp_path / "x")], cwd=HERE, stderr=subprocess.PIPE, text=True, env=env)
             for flag, name in cases.items()}  # both at once: each spends seconds importing torch  # fmt: skip
    for flag, proc in procs.items():
        stderr = proc.communicate(timeout=120)[1]
        assert proc.returncode == 1 and stderr.count("\n") == 1 and "Traceback" not in stderr
        reason = "HF_HUB_OFFLINE is set" if offline == "HF_HUB_OFFLINE" else "cannot be reached"
        assert f"{flag} {cases[flag]}: no local file or folder of that name here, and " in stderr
        assert reason in stderr and "nor is it in the local cache" in stderr
    assert time.time() - start < 45 and not (tmp_path / "x").exists()


# ----------------------------------------------------------------------------------------------
# Several processes: torchrun + FSDP2 on CPU with gloo

DISTRIBUTED_CASES = [("s2t", "token", 2), ("high-entropy", "token", 1), ("none", "sequence", 1)]  # mask, agg, minis


def join_two_ranks(rank: int, port: int):
    """A worker's process group, as torchrun makes it: the store is the parent's (run_two_ranks), not rank 0's,
    so no rank's exit takes the store from under the other. Returns the store, for leave_two_ranks."""
    import torch.distributed as dist

    os.environ.update(RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    store = dist.TCPStore("127.0.0.1", port, world_size=2, is_master=False)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=2)
    return store


def leave_two_ranks(store):
    """Both ranks leave together: no rank exits before both have destroyed the group, and neither runs the
    interpreter's finalization, where gloo's threads can abort a process (SIGABRT, 'terminate called without
    an active exception'; once in a CI run here). An exception before this still fails the test."""
    import torch.distributed as dist

    rank = dist.get_rank()
    dist.barrier()
    dist.destroy_process_group()
    store.set(f"left-{rank}", "1")
    store.wait(["left-0", "left-1"])
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def one_process_update(model, rollouts, advantages, cfg):
    """Weights after one ppo_update with SGD, and the silenced (row, position) pairs."""
    model = copy.deepcopy(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    old_logp, entropy = stapo.score(model, rollouts, list(range(len(rollouts.prompts))), cfg)
    _, silenced = stapo.ppo_update(model, optimizer, rollouts, old_logp, entropy, advantages, cfg)
    return model.state_dict(), sorted((s["sample"], s["position"]) for s in silenced)


def two_rank_worker(rank: int, port: int, case_file: str, out_file: str):
    """One of two gloo ranks: each case's update on this rank's share of the rollouts, then a generate
    in which rank 0 stops after 4 tokens and rank 1 after 48, in two calls each."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    store = join_two_ranks(rank, port)
    case = torch.load(case_file, weights_only=False)  # written by this test a moment ago
    results = {}
    for mask, loss_agg, mini_batches in DISTRIBUTED_CASES:
        model, tok = stapo.load_policy("tiny", CPU)
        model.load_state_dict(case["weights"])
        stapo.shard_model(model, bf16=False)
        cfg = dataclasses.replace(
            case["cfg"],
            mask=mask,
            loss_agg=loss_agg,
            mini_batches=mini_batches,
            micro_batch_tokens=10**6 if rank == 0 else 1,
        )  # 1 vs 4-8 micro-batches: in step
        groups = stapo.my_share(list(range(cfg.prompts_per_step)), mini_batches)
        rows = [g * cfg.group_size + j for g in groups for j in range(cfg.group_size)]
        r = case["rollouts"]
        mine = stapo.Rollouts(
            [r.prompts[i] for i in rows], r.completions[rows], r.completion_mask[rows], r.truncated[rows]
        )
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        old_logp, entropy = stapo.score(model, mine, list(range(len(rows))), cfg)
        _, silenced = stapo.ppo_update(model, optimizer, mine, old_logp, entropy, case["advantages"][rows], cfg)
        weights = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        spurious = stapo.all_records([(rows[s["sample"]], s["position"]) for s in silenced])
        results[mask, loss_agg] = (weights, sorted(spurious))
    uneven = dataclasses.replace(case["cfg"], max_new_tokens=4 if rank == 0 else 48, generate_batch=2)  # 2 calls each
    generated = stapo.generate(model, tok, [stapo.encode_prompt("1+1?", tok)] * 4, uneven)
    lengths = stapo.all_records([generated.completions.shape[1]])
    if rank == 0:
        torch.save({"results": results, "lengths": lengths}, out_file)
    leave_two_ranks(store)


def run_two_ranks(worker, args, timeout: float = 180):
    import torch.multiprocessing as mp

    store = torch.distributed.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)  # as torchrun's agent
    context = mp.start_processes(worker, args=(store.port, *args), nprocs=2, join=False, start_method="spawn")
    deadline = time.time() + timeout
    while not context.join(timeout=1):
        if time.time() > deadline:  # a hang fails the test instead of blocking CI
            for process in context.processes:
                process.kill()
            pytest.fail(f"two ranks did not finish within {timeout} s")


@pytest.mark.slow
def test_the_update_does_not_depend_on_the_number_of_processes(tiny, tmp_path):
    model, tok = tiny
    cfg = tiny_cfg(max_new_tokens=16, tau_p=0.5, grad_clip=1.0)  # many candidates: the quantile matters
    rollouts, advantages = rollout_batch(model, tok, cfg)
    torch.save({"weights": model.state_dict(), "cfg": cfg, "rollouts": rollouts, "advantages": advantages},
               tmp_path / "case.pt")  # fmt: skip
    run_two_ranks(two_rank_worker, (str(tmp_path / "case.pt"), str(tmp_path / "out.pt")))
    out = torch.load(tmp_path / "out.pt", weights_only=False)
    for mask, loss_agg, mini_batches in DISTRIBUTED_CASES:
        cfg_case = dataclasses.replace(cfg, mask=mask, loss_agg=loss_agg, mini_batches=mini_batches)
        weights, spurious = one_process_update(model, rollouts, advantages, cfg_case)
        two_weights, two_spurious = out["results"][mask, loss_agg]
        worst = max((weights[k] - two_weights[k]).abs().max().item() for k in two_weights)
        moved = max((weights[k] - model.state_dict()[k]).abs().max().item() for k in two_weights)
        print(
            f"\n{mask}/{loss_agg}/{mini_batches} mini-batches: 1 vs 2 processes max |dw| {worst:.1e} (step {moved:.1e})"
        )
        assert worst < 1e-6 and moved > 1e-4
        assert spurious == two_spurious and (mask != "s2t" or len(spurious) > 0)
    assert out["lengths"] == [4, 48]  # the rank that stopped early did not hang the other


def dtypes_of_a_step(model, tok, out_dir: Path) -> dict:
    """One train_step with AdamW, then a checkpoint: the dtypes of the parameters, the gradients (as the optimizer
    step sees them), the AdamW states and every tensor saved (on rank 0 under torchrun)."""
    cfg = tiny_cfg(out_dir, max_new_tokens=8, tau_p=0.5)
    optimizer, scheduler = stapo.build_optimizer(model, cfg)
    grads, step = set(), stapo.optimizer_step

    def recording(model, optimizer, grad_clip):
        grads.update(p.grad.dtype for p in model.parameters() if p.grad is not None)
        return step(model, optimizer, grad_clip)

    stapo.optimizer_step = recording
    problems = [{**e, "prompt_ids": stapo.encode_prompt(e["problem"], tok)} for e in stapo.toy_problems()]
    stapo.train_step(model, tok, optimizer, problems, 0, cfg)
    stapo.optimizer_step = step
    ckpt = stapo.save_checkpoint(model, tok, optimizer, scheduler, cfg, 1, stapo.rng_states())
    dtypes = {"parameters": {p.dtype for p in model.parameters()}, "gradients": grads,
              "adamw": {t.dtype for s in optimizer.state.values() for t in s.values() if t.dim() > 0}}  # fmt: skip
    if stapo.rank_and_world()[0] == 0:
        from safetensors.torch import load_file

        saved = torch.load(ckpt / "optimizer.pt", weights_only=True)["state"]
        dtypes["saved"] = {t.dtype for t in load_file(ckpt / "model.safetensors").values()}
        dtypes["saved adamw"] = {t.dtype for s in saved.values() for t in s.values() if t.dim() > 0}
    return dtypes


def bf16_checkpoint(folder: Path, seed: int = 3):
    """A model folder as the Hub has them: bf16 weights and a config that says bfloat16."""
    model, tok = stapo.load_policy("tiny", CPU, seed=seed)  # not the weights a rank would build by itself
    model.to(torch.bfloat16).save_pretrained(folder)
    tok.save_pretrained(folder)
    assert json.loads((folder / "config.json").read_text())["dtype"] == "bfloat16"
    return model


def sharded_load_worker(rank: int, port: int, folder: str, out_file: str):
    """One of two gloo ranks loads a model folder sharded; records what each rank read whole, then a step's dtypes."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    store = join_two_ranks(rank, port)
    reads, load_model = [], stapo.load_model
    stapo.load_model = lambda *args, **kwargs: reads.append(args[0]) or load_model(*args, **kwargs)
    tok = stapo.load_tokenizer(folder)
    model = stapo.load_sharded_model(folder, CPU, tok)
    local = {k: p.to_local().numel() for k, p in model.named_parameters()}  # this rank's shards
    weights = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    buffers = stapo.all_records([{k: b.clone() for k, b in model.named_buffers()}])
    reads = stapo.all_records([reads])
    eos = stapo.all_records([model.generation_config.eos_token_id])
    removed, rmtree = [], shutil.rmtree  # rank 0 writes the checkpoint: no other rank may remove its temporary folder
    shutil.rmtree = lambda path, *args, **kwargs: removed.append(Path(path).name) or rmtree(path, *args, **kwargs)
    dtypes = stapo.all_records([dtypes_of_a_step(model, tok, Path(out_file).parent / "run")])
    removed = stapo.all_records([removed])
    if rank == 0:
        torch.save({"weights": weights, "buffers": buffers, "reads": reads, "local": local, "eos": eos,
                    "dtypes": dtypes, "removed": removed}, out_file)  # fmt: skip
    leave_two_ranks(store)


def test_a_bf16_config_trains_fp32_weights_in_one_process(tmp_path):
    bf16_checkpoint(tmp_path / "model")
    model, tok = stapo.load_policy(str(tmp_path / "model"), CPU)
    assert all(v == {torch.float32} for v in dtypes_of_a_step(model, tok, tmp_path / "run").values())


@pytest.mark.slow
def test_torchrun_loads_weights_on_rank_0_only_into_fp32_shards(tmp_path):
    bf16_checkpoint(tmp_path / "model")
    model, _ = stapo.load_policy(str(tmp_path / "model"), CPU)  # one process reads the same folder
    run_two_ranks(sharded_load_worker, (str(tmp_path / "model"), str(tmp_path / "out.pt")))
    out = torch.load(tmp_path / "out.pt", weights_only=False)
    assert out["reads"] == [[str(tmp_path / "model")], []]  # rank 1 never loads the whole model
    one = model.state_dict()
    assert sum(out["local"].values()) < sum(p.numel() for p in model.parameters())  # rank 0 keeps a shard too
    assert all(torch.equal(out["weights"][k], one[k]) for k in out["weights"]) and len(out["weights"]) >= len(
        dict(model.named_parameters())
    )
    for buffers in out["buffers"]:  # the rotary frequencies, not in a state dict, reach rank 1 as well
        assert all(torch.equal(b, model.get_buffer(k)) for k, b in buffers.items())
    assert out["eos"][0] == out["eos"][1] == model.generation_config.eos_token_id
    # the config says bfloat16, as every Hub Qwen3 config does: the shards, gradients, AdamW states and the
    # checkpoint are fp32 all the same (bf16 weights would drop a 1e-6 update)
    for rank_dtypes in out["dtypes"]:
        assert rank_dtypes and all(v == {torch.float32} for v in rank_dtypes.values()), rank_dtypes
    assert {"saved", "saved adamw"} <= out["dtypes"][0].keys()
    assert ".tmp-step-000001" in out["removed"][0] and out["removed"][1] == []


def bf16_rollouts_worker(rank: int, port: int, out_file: str):
    """One of two gloo ranks: FSDP2 with bf16 gathers, then rollouts; records the weights and the cache's dtypes."""
    from transformers.cache_utils import DynamicLayer

    store = join_two_ranks(rank, port)
    tok = stapo.load_tokenizer("tiny")
    model = stapo.load_sharded_model("tiny", CPU, tok, bf16=True)
    with stapo.sampling_weights(model, bf16=True) as sampler:
        gathered = next(sampler.parameters()).dtype
    seen, update = [], DynamicLayer.update
    DynamicLayer.update = lambda self, k, v, *a, **kw: seen.append((k.dtype, v.dtype)) or update(self, k, v, *a, **kw)
    stapo.generate(model, tok, [stapo.encode_prompt("1+1?", tok)] * 2, tiny_cfg(precision="bf16-autocast"), "x")
    records = stapo.all_records([(gathered, sorted(set(seen), key=str))])
    if rank == 0:
        torch.save(records, out_file)
    leave_two_ranks(store)


@pytest.mark.slow
def test_torchrun_bf16_rollouts_sample_from_the_gathered_bf16_weights(tmp_path):
    """Under FSDP2 the gathered weights are bf16 already: no copy, and the cache holds bf16 keys and values."""
    run_two_ranks(bf16_rollouts_worker, (str(tmp_path / "out.pt"),))
    assert torch.load(tmp_path / "out.pt") == [(torch.bfloat16, [(torch.bfloat16, torch.bfloat16)])] * 2


def test_the_process_group_waits_as_long_as_dist_timeout_min(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda *args, **kwargs: calls.append((args, kwargs)))
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 0)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    stapo.start_distributed(tiny_cfg(device="cpu", dist_timeout_min=240))
    assert calls == [(("gloo",), {"timeout": datetime.timedelta(minutes=240), "device_id": None})]


def torchrun(args: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "stapo.py"]
    return subprocess.run([*command, *args], cwd=HERE, capture_output=True, text=True, timeout=timeout, env=env)


@pytest.mark.slow
def test_torchrun_stops_on_sigterm_saves_the_last_step_and_resumes_exactly(tmp_path):
    """torchrun's agent forwards SIGTERM (or Ctrl-C) to every rank and kills them ~30 s later: the ranks stop together
    at the next safe point, save the last completed step, and the run resumes from it as if never stopped."""
    from safetensors.torch import load_file

    flags = [*SMALL, "--prompts-per-step", "4", "--device", "cpu", "--tau-p", "0.5", "--lr", "1e-3", "--steps", "4"]
    straight = torchrun([*flags, "--save-every", "2", "--output-dir", str(tmp_path / "a")])
    assert straight.returncode == 0, straight.stderr[-3000:]
    metrics = read_metrics(tmp_path / "a" / "metrics.jsonl")
    assert [m["samples"] for m in metrics] == [8, 8, 8, 8]  # P x G of both ranks in every row

    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    proc, out = start([*flags, "--save-every", "100", "--output-dir", str(tmp_path / "b")], launcher)
    wait_for(lambda: any(line.startswith("step    1/") for line in out))
    proc.send_signal(signal.SIGTERM)  # to the launcher, as a scheduler does
    finish(proc)
    done = len(steps_of(tmp_path / "b" / "metrics.jsonl"))
    ckpt = tmp_path / "b" / f"step-{done:06d}"
    assert 1 <= done < 4 and (ckpt / "optimizer.pt").exists() and any("resume with: torchrun" in line for line in out)
    resumed = torchrun(["--resume", str(ckpt)])  # in its own folder, to the 4 steps of its config
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    again = read_metrics(tmp_path / "b" / "metrics.jsonl")
    assert [m["step"] for m in again] == [1, 2, 3, 4]
    for key in ("reward", "len_mean", "n_spurious", "loss", "grad_norm"):
        assert [m[key] for m in again] == pytest.approx([m[key] for m in metrics], rel=1e-5, abs=1e-7), key
    a, b = (load_file(tmp_path / run / "step-000004" / "model.safetensors") for run in ("a", "b"))
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    initial = stapo.load_policy("tiny", CPU, seed=0)[0].state_dict()  # the run trained, one process reads it
    assert any(not torch.equal(a[k], initial[k]) for k in a)

    with pytest.raises(SystemExit):  # another number of processes: a clear stop
        stapo.parse_args(["--resume", str(tmp_path / "a" / "step-000002"), "--steps", "5"])


# ----------------------------------------------------------------------------------------------
# Curves, trackers and log files


def test_read_jsonl_drops_a_torn_last_line_with_a_warning(tmp_path, capsys):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n{"step": 4, "rew')
    assert [r["step"] for r in stapo.read_jsonl(path)] == [1, 2, 3]
    assert "metrics.jsonl: line 4 is cut short" in capsys.readouterr().err


def test_read_jsonl_stops_at_a_malformed_line_before_the_last(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2, oops}\n{"step": 3}\n')
    with pytest.raises(SystemExit, match=r"metrics.jsonl: line 2: not a JSON object"):
        stapo.read_jsonl(path)


# ----------------------------------------------------------------------------------------------
# Trackers: fake packages in sys.modules record the calls


def fake_wandb_like(kind: str, calls: list) -> types.ModuleType:
    """A module with wandb's (and trackio's) init/log/finish that appends each call to `calls`."""
    fake = types.ModuleType(kind)
    fake.__spec__ = importlib.machinery.ModuleSpec(kind, None)  # importable, as far as parse_args can tell
    fake.init = lambda **kwargs: calls.append(("init", kwargs))
    fake.log = lambda metrics, step=None: calls.append(("log", metrics, step))
    fake.finish = lambda: calls.append(("finish",))
    return fake


@pytest.mark.parametrize("kind", ["wandb", "trackio"])
def test_wandb_and_trackio_get_the_config_and_each_step(kind, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setitem(sys.modules, kind, fake_wandb_like(kind, calls))
    stapo.main([*SMALL, "--steps", "2", "--report-to", kind, "--output-dir", str(tmp_path / "run-7")])
    (_, init), *logs, finish = calls
    assert init["project"] == "stapo" and init["name"] == "run-7" and init["config"]["report_to"] == kind
    assert [(name, step) for name, _, step in logs] == [("log", 1), ("log", 2)] and finish == ("finish",)
    metrics = json.loads((tmp_path / "run-7" / "metrics.jsonl").read_text().splitlines()[-1])
    assert logs[-1][1] == {k: v for k, v in metrics.items() if isinstance(v, int | float)}  # numbers only


# ----------------------------------------------------------------------------------------------
# The CPU demo: STAPO at work on a tiny model, next to JustRL


@pytest.mark.slow
def test_tiny_sft_is_taught_the_answer_format():
    random.seed(0)
    model, tok = stapo.load_policy("tiny-sft", CPU)
    prompts = [stapo.encode_prompt(e["problem"], tok) for e in stapo.toy_problems()] * 8
    rollouts = stapo.generate(model, tok, prompts, tiny_cfg(max_new_tokens=16))
    texts = [tok.decode(c[m]) for c, m in zip(rollouts.completions, rollouts.completion_mask, strict=True)]
    assert sum(re.fullmatch(r"\\boxed\{\d\}<\|im_end\|>", t) is not None for t in texts) >= 12, texts
