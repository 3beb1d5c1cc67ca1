"""Tests for stapo.py on CPU with a tiny random Qwen3: `pytest -q`."""

import copy
import dataclasses
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
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


def test_training_logp_equals_sampler_logp_with_left_padding(tiny):
    from transformers import GenerationConfig

    model, tok = tiny
    cfg = tiny_cfg(temperature=0.7, max_new_tokens=10)
    texts = ["1+1?", "a much longer problem statement than the first one"]  # different lengths: left padding
    prompts = [stapo.encode_prompt(t, tok) for t in texts]
    ids, mask = stapo.left_pad(prompts, tok.pad_token_id)
    assert mask[0].sum() < mask.shape[1]  # the first prompt really is padded
    gen = GenerationConfig(do_sample=True, temperature=0.7, top_k=0, top_p=1.0, max_new_tokens=10,
                           eos_token_id=[-1], pad_token_id=tok.pad_token_id, output_scores=True,
                           return_dict_in_generate=True)  # fmt: skip
    torch.manual_seed(1)
    out = model.eval().generate(input_ids=ids, attention_mask=mask, generation_config=gen)
    completions = out.sequences[:, ids.shape[1] :]  # (2, 10)
    sampler = torch.stack(out.scores, 1).log_softmax(-1).gather(-1, completions[..., None]).squeeze(-1)
    rollouts = stapo.Rollouts(prompts, completions, torch.ones_like(completions, dtype=torch.bool), torch.zeros(2))
    logp, _ = stapo.score(model, rollouts, [0, 1], cfg)
    assert torch.allclose(logp, sampler, atol=1e-5), (logp - sampler).abs().max()


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


def test_generation_is_chunked_to_the_kv_cache_budget(tiny):
    model, tok = tiny
    # tiny in fp32: 2 layers x 2 KV heads x 16 dims x K,V x 4 bytes = 512 bytes per token
    cfg = tiny_cfg(max_new_tokens=8, kv_cache_gb=3 * 512 * (24 + 8) / 2**30)
    assert stapo.sequences_per_generate(model, 24, cfg) == 3
    assert stapo.sequences_per_generate(model, 10**6, cfg) == 1  # never zero
    prompts = [torch.arange(20, 44)] * 7  # 3 generate calls: 3 + 3 + 1
    r = stapo.generate(model, tok, prompts, cfg)
    assert r.completions.shape[0] == 7 and r.completion_mask[:, 0].all()


# ----------------------------------------------------------------------------------------------
# Updates: micro-batch invariance, precision


def rollout_batch(model, tok, cfg, seed=0):
    torch.manual_seed(seed)
    problems = stapo.toy_problems()[: cfg.prompts_per_step]
    prompts = [stapo.encode_prompt(e["problem"], tok) for e in problems for _ in range(cfg.group_size)]
    rollouts = stapo.generate(model, tok, prompts, cfg)
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0] * (len(prompts) // 4))  # mixed groups: nonzero advantages
    return rollouts, stapo.group_advantages(rewards, cfg.group_size)


def one_update(model, rollouts, advantages, cfg):
    model = copy.deepcopy(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # grads only
    old_logp, entropy = stapo.score(model, rollouts, list(range(len(rollouts.prompts))), cfg)
    stats, _ = stapo.ppo_update(model, optimizer, rollouts, old_logp, entropy, advantages, cfg)
    return stats["loss"], {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("mask", ["s2t", "none", "high-entropy"])
def test_micro_batch_invariance(tiny, mask):
    model, tok = tiny
    cfg = tiny_cfg(max_new_tokens=20, mask=mask, tau_p=0.5, grad_clip=1e9)  # tau_p 0.5: a random model has candidates
    rollouts, advantages = rollout_batch(model, tok, cfg)
    whole_loss, whole = one_update(model, rollouts, advantages, dataclasses.replace(cfg, micro_batch_tokens=10**6))
    split_loss, split = one_update(model, rollouts, advantages, dataclasses.replace(cfg, micro_batch_tokens=1))
    n_micro = len(stapo.micro_batches(rollouts, list(range(16)), 1))
    assert n_micro == 16
    assert abs(whole_loss - split_loss) < 1e-6
    worst = max((whole[n] - split[n]).abs().max().item() for n in whole)
    assert worst < 1e-6, worst


def test_gradient_checkpointing_gives_the_same_gradients(tiny):
    model, tok = tiny
    cfg = tiny_cfg(max_new_tokens=20, mask="none")
    rollouts, advantages = rollout_batch(model, tok, cfg)
    plain_loss, plain = one_update(model, rollouts, advantages, cfg)
    checkpointed = copy.deepcopy(model)
    checkpointed.activation_checkpointing_enable()
    checkpointed.train()
    ckpt_loss, ckpt = one_update(checkpointed, rollouts, advantages, cfg)
    assert abs(plain_loss - ckpt_loss) < 1e-6
    assert max((plain[n] - ckpt[n]).abs().max().item() for n in plain) < 1e-6


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
    assert stats["n_spurious"] == len(silenced) > 0 and stats["n_candidates"] > stats["n_spurious"]
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
# Verifier


VERIFY_TABLE = [
    # (completion, gold, expected)  # reason
    (r"so \boxed{42}", "42", True),  # plain integer
    (r"\boxed{42}", "43", False),  # wrong integer
    (r"\boxed{025}", "25", True),  # zero padded (AIME24 gold style)
    (r"\boxed{25}", "025", True),  # zero-padded gold
    (r"\boxed{27}", "27.0", True),  # AMC23 float gold
    (r"\boxed{27.5}", "27.0", False),  # not the same number
    (r"\boxed{1,000}", "1000", True),  # thousands separator
    (r"\boxed{1{,}000}", "1000", True),  # LaTeX thousands separator
    (r"\boxed{\$18.90}", r"\$18.90", True),  # dollars
    (r"\boxed{18.9}", r"\$18.90", True),  # dollar sign and trailing zero
    (r"\boxed{90^\circ}", "90", True),  # degrees
    (r"\boxed{90}", r"90^{\circ}", True),  # degrees in the gold
    (r"\boxed{50\%}", "50", True),  # percent sign
    (r"\boxed{\dfrac{1}{2}}", r"\frac{1}{2}", True),  # dfrac
    (r"\boxed{\tfrac12}", r"\frac{1}{2}", True),  # tfrac without braces
    (r"\boxed{\frac12}", r"\frac{1}{2}", True),  # frac shorthand
    (r"\boxed{0.5}", r"\frac{1}{2}", True),  # decimal vs fraction
    (r"\boxed{1/2}", r"\frac{1}{2}", True),  # slash fraction
    (r"\boxed{-\frac{1}{2}}", "-0.5", True),  # negative fraction
    (r"\boxed{\frac{1}{3}}", "0.33", False),  # rounding beyond tolerance
    (r"\boxed{0.333333}", r"\frac{1}{3}", True),  # within relative tolerance
    (r"\boxed{4.5 \times 10^{33}}", "4.5e33", True),  # scientific notation, LaTeX vs Python
    (r"\boxed{4.5e33}", r"4.5\times10^{33}", True),  # scientific notation reversed
    (r"\boxed{4.6e33}", "4.5e33", False),  # different mantissa
    (r"\boxed{10^{5}}", "100000", True),  # power of ten
    (r"\boxed{123456789012}", "123456789013", False),  # large integers compare exactly
    (r"\boxed{\text{Evelyn}}", r"\text{Evelyn}", True),  # text answer
    (r"\boxed{Evelyn}", r"\text{Evelyn}", True),  # text wrapper dropped
    (r"\boxed{\textbf{(C)}}", r"\text{(C)}", True),  # multiple choice letter
    (r"\boxed{C}", r"\text{(C)}", True),  # bare letter vs (C)
    (r"\boxed{10 \text{ cm}}", "10", True),  # unit in \text
    (r"\boxed{10 cm}", "10", True),  # unit word
    (r"\boxed{5\text{ cm}^2}", "5", True),  # squared unit
    (r"\boxed{\frac{270}7\text{ degrees}}", r"\frac{270}{7}", True),  # MATH500 gold with unit
    (r"\boxed{x = 5}", "5", True),  # single-symbol left side
    (r"\boxed{5}", "x=5", True),  # left side in the gold
    (r"\boxed{\theta = 30}", "30", True),  # command as the left side
    (r"\boxed{x+y=5}", "5", False),  # not a single symbol: kept
    (r"\boxed{\left( 3, \frac{\pi}{2} \right)}", r"\left( 3, \frac{\pi}{2} \right)", True),  # tuple with left/right
    (r"\boxed{(3,\frac{\pi}{2})}", r"(3, \frac{\pi}{2})", True),  # tuple spacing
    (r"\boxed{(3,4]}", "(3,4]", True),  # half-open interval
    (r"\boxed{(3,4)}", "(3,4]", False),  # bracket types must match
    (r"\boxed{[3,4]}", "(3,4)", False),  # closed vs open
    (r"\boxed{(2,\infty)}", r"(2,\infty)", True),  # infinite interval
    (r"\boxed{(1,2)}", "(2,1)", False),  # tuples are ordered
    (r"\boxed{(1.0,2)}", "(1,2)", True),  # tuple elements compare as numbers
    (r"\boxed{3, 5, 7}", "3, 5, 7", True),  # bare list
    (r"\boxed{7,3,5}", "3, 5, 7", True),  # bare lists are unordered
    (r"\boxed{3,5}", "3, 5, 7", False),  # missing element
    (r"\boxed{1,-2}", "-2, 1", True),  # negative element in a list
    (r"\boxed{\{1,2\}}", r"\{2,1\}", True),  # sets are unordered
    (r"\boxed{\sqrt{2}}", r"\sqrt2", True),  # sqrt shorthand
    (r"\boxed{2\sqrt{3}}", r"2\sqrt{3}", True),  # symbolic expression
    (r"\boxed{2\sqrt{3}}", r"3\sqrt{2}", False),  # different expression
    (r"\boxed{\begin{pmatrix} 1 \\ 2 \end{pmatrix}}", r"\begin{pmatrix}1\\2\end{pmatrix}", True),  # matrix
    (r"\fbox{12}", "12", True),  # fbox
    (r"\boxed 12", "12", True),  # boxed without braces
    (r"\boxed{1} then \boxed{2}", "2", True),  # the last box is the answer
    (r"\boxed{1} then \boxed{2}", "1", False),  # an earlier box is not
    (r"\boxed{1}\boxed{2}", "1,2", False),  # two boxes are not one answer
    (r"\boxed{\frac{1}{2}", r"\frac{1}{2}", False),  # unbalanced braces
    (r"the answer is 42", "42", False),  # no box
    (r"\boxed{}", "", False),  # empty prediction and gold
    (r"\boxed{}", "0", False),  # empty prediction
    (r"\boxed{5}", "", False),  # empty gold never rewards
    (r"\boxed{5}", r"\boxed{", False),  # unparsable gold never rewards
    (r"\boxed{5}", r"\boxed{5}", True),  # gold wrapped in a box
    (r"\boxed{\frac{1}{2}}", r"\frac{1}{2", False),  # a gold with unbalanced braces never rewards
    (r"\boxed{2n-2}", "$2n-2$", True),  # OlympiadBench dollar-wrapped gold
    (r"\boxed{(-\infty, 0) \cup\{1\}}", r"$(-\infty, 0) \cup\{1\}$.", True),  # gold with trailing period
    (r"\boxed{5.}", "5", True),  # trailing period
    (r"\boxed{ 5 }", "5", True),  # spaces
    (r"\boxed{\!5\,}", "5", True),  # LaTeX spacing commands
    (r"\boxed{-3}", "3", False),  # sign matters
    (r"\boxed{0}", "0.0", True),  # zero
    (r"\boxed{1e999999}", "1e999999", True),  # infinities compare as identical strings only
    (r"\boxed{1e999999}", "2e999999", False),  # overflow is not a number
    (r"\boxed{\infty}", r"\infty", True),  # infinity symbol
    (r"\boxed{Yes}", "No", False),  # different words
]


@pytest.mark.parametrize(("completion", "gold", "expected"), VERIFY_TABLE)
def test_verify_table(completion, gold, expected):
    assert stapo.verify(completion, gold) is expected


def test_verify_table_is_large_enough():
    assert len(VERIFY_TABLE) >= 60


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
    ],
)
def test_verify_is_total_and_fast_on_hostile_input(text):
    for gold in (text, "42", "(1,2]", "1, 2, 3"):
        start = time.perf_counter()
        assert stapo.verify(text, gold) in (True, False)
        assert time.perf_counter() - start < 0.05


def test_verifier_on_real_benchmarks():
    """The rates of issue 3 on ../shared/benchmarks (present beside the repo in CI)."""
    bench = HERE.parent / "shared" / "benchmarks"
    if not bench.exists():
        pytest.skip("../shared/benchmarks is not beside this checkout")
    raw = {name: [json.loads(line) for line in (bench / b.file).open()] for name, b in ev.BENCHMARKS.items()}
    stapo.normalize_answer.cache_clear()
    calls, worst = 0, 0.0
    start = time.perf_counter()

    def timed(completion, gold):
        nonlocal calls, worst
        t = time.perf_counter()
        ok = stapo.verify(completion, gold)
        worst = max(worst, time.perf_counter() - t)
        calls += 1
        return ok

    math500 = raw["math500"]
    rate = sum(timed(r["solution"], r["answer"]) for r in math500) / len(math500)
    print(f"\nMATH500 solution vs answer: {rate:.2%}")
    assert rate >= 0.995
    for name in ("aime24", "aime25", "amc23"):
        golds = [r["answer"] for r in raw[name]]  # as in the file: "025", 27.0
        right = sum(timed(f"so \\boxed{{{int(g)}}}", str(g)) for g in golds) / len(golds)
        wrong = sum(not timed(f"so \\boxed{{{int(g) + 1}}}", str(g)) for g in golds) / len(golds)
        print(f"{name}: N correct {right:.2%}, N+1 wrong {wrong:.2%}")
        assert right == 1.0 and wrong == 1.0
    golds = [r["final_answer"][0] for r in raw["olympiadbench"]]  # "$2n-2$"
    rate = sum(timed(f"\\boxed{{{g.strip('$')}}}", g) for g in golds) / len(golds)
    print(f"OlympiadBench boxed final answer: {rate:.2%}")
    assert rate >= 0.995
    shuffled = random.Random(0).sample(math500, len(math500))
    pairs = [(r["solution"], s["answer"]) for r, s in zip(math500, shuffled, strict=True) if r["answer"] != s["answer"]]
    false_positive = sum(timed(sol, gold) for sol, gold in pairs) / len(pairs)
    print(f"negatives judged correct: {false_positive:.3%} of {len(pairs)}")
    assert false_positive <= 0.001
    mean_ms = (time.perf_counter() - start) / calls * 1000
    print(f"verify: {calls} calls, mean {mean_ms:.3f} ms, worst {worst * 1000:.2f} ms")
    assert mean_ms < 0.2


# ----------------------------------------------------------------------------------------------
# Data


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        ({"problem": "1+1?", "answer": "2"}, {"problem": "1+1?", "answer": "2"}),  # MATH style
        ({"question": "1+1?", "answer": 2.0}, {"problem": "1+1?", "answer": "2"}),  # AMC float gold
        ({"question": "q", "final_answer": ["$x$"]}, {"problem": "q", "answer": "$x$"}),  # OlympiadBench list
        ({"problem": "q", "solution": r"so \boxed{7}."}, {"problem": "q", "answer": "7"}),  # worked solution
        ({"prompt": "q", "solution": "34"}, {"problem": "q", "answer": "34"}),  # open-r1 DAPO copy
        (
            {"prompt": [{"role": "user", "content": stapo.DAPO_PREFIX + "Find x." + stapo.DAPO_SUFFIX}],
             "reward_model": {"ground_truth": "12", "style": "rule"}},
            {"problem": "Find x.", "answer": "12"},
        ),  # Hub DAPO: chat list, wrapper stripped, gold in reward_model
        ({"problem": "q", "answer": None}, None),  # no answer: skipped
        ({"problem": "q", "answer": "  "}, None),  # blank answer: skipped
    ],
)  # fmt: skip
def test_row_to_example(row, expected):
    assert stapo.row_to_example(row) == expected


def test_row_to_example_with_explicit_keys():
    assert stapo.row_to_example({"q": "x?", "gold": 3}, "q", "gold") == {"problem": "x?", "answer": "3"}


def test_load_local_jsonl_counts_skipped_rows(tmp_path, capsys):
    path = tmp_path / "d.jsonl"
    path.write_text(
        "\n".join(json.dumps(r) for r in [{"problem": "a", "answer": "1"}, {"problem": "b", "answer": None}])
    )
    problems = stapo.load_problems(tiny_cfg(dataset=str(path)))
    assert problems == [{"problem": "a", "answer": "1"}]
    assert "1 rows without a usable answer skipped" in capsys.readouterr().out


def test_unrecognised_columns_fail_with_the_columns_and_flags(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"text": "a", "label": "1"}) + "\n")
    with pytest.raises(SystemExit, match=r"\['text', 'label'\].*--problem-key and --answer-key"):
        stapo.load_problems(tiny_cfg(dataset=str(path)))


def test_prompt_formats(tiny):
    _, tok = tiny
    chat = stapo.build_prompt("What is 1+1?", tok, "chat")
    plain = stapo.build_prompt("What is 1+1?", tok, "plain")
    assert chat.startswith("<|im_start|>user\nWhat is 1+1?") and chat.endswith("<|im_start|>assistant\n")
    assert plain.startswith("What is 1+1?") and stapo.INSTRUCTION in plain and "<|im_start|>" not in plain


def test_data_order_is_a_permutation_per_epoch():
    problems = list(range(10))
    first_epoch = [x for step in range(5) for x in stapo.prompts_for_step(problems, step, 2, seed=3)]
    assert sorted(first_epoch) == problems
    assert stapo.prompts_for_step(problems, 7, 2, seed=3) == stapo.prompts_for_step(problems, 7, 2, seed=3)


# ----------------------------------------------------------------------------------------------
# End to end


def run_cli(args, cwd=HERE, timeout=120):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "stapo.py", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=env)  # fmt: skip


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
    keys = {"reward", "frac_zero_std", "len_mean", "truncated_frac", "entropy", "n_candidates", "n_spurious",
            "spurious_frac", "tau_h", "clip_frac", "loss", "grad_norm", "lr", "gen_s", "train_s"}  # fmt: skip
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


def test_cli_smoke_run_from_the_readme(tmp_path):
    start = time.time()
    result = run_cli(["--model", "tiny", "--dataset", "toy", "--steps", "3", "--output-dir", str(tmp_path)])
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("| reward") == 3 and (tmp_path / "step-000003" / "model.safetensors").exists()
    assert time.time() - start < 60


def test_ctrl_c_finishes_the_step_and_saves(tmp_path):
    args = ["--model", "tiny", "--dataset", "toy", "--steps", "1000", "--prompts-per-step", "2", "--group-size", "2",
            "--max-new-tokens", "8", "--output-dir", str(tmp_path)]  # fmt: skip
    proc = subprocess.Popen([sys.executable, "stapo.py", *args], cwd=HERE, stdout=subprocess.PIPE, text=True)
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 60
    while not (metrics.exists() and metrics.read_text().count("\n") >= 1) and time.time() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0
    done = metrics.read_text().count("\n")
    assert (tmp_path / f"step-{done:06d}" / "model.safetensors").exists(), out
    assert done < 1000


def test_unknown_dataset_file_fails_clearly(tmp_path):
    result = run_cli(["--model", "tiny", "--dataset", str(tmp_path / "missing.jsonl"), "--output-dir", str(tmp_path)])
    assert result.returncode != 0 and "no such file" in result.stderr


# ----------------------------------------------------------------------------------------------
# Learning: STAPO updates raise the reward of a tiny model on a toy task


def test_stapo_learns_a_toy_task():
    """Problems "000...0" and "111...1" (answer: the digit). A short supervised warm-up teaches the
    format \\boxed{d} with a uniformly random digit (reward ~0.1); STAPO must learn which digit."""
    torch.manual_seed(0)
    random.seed(0)
    model, tok = stapo.load_policy("tiny", CPU, seed=0)
    cfg = tiny_cfg(prompts_per_step=8, group_size=8, max_new_tokens=16, lr=1e-3, warmup_steps=10, weight_decay=0.0)
    problems = [{"problem": str(d) * 40, "answer": str(d)} for d in range(2)]
    for p in problems:
        p["prompt_ids"] = stapo.encode_prompt(p["problem"], tok)
    end = tok.convert_tokens_to_ids("<|im_end|>")
    warmup = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(300):  # format only: the digit is random
        seqs, starts = [], []
        for p in random.choices(problems, k=16):
            target = tok(f"\\boxed{{{random.randint(0, 9)}}}", add_special_tokens=False)["input_ids"] + [end]
            seqs.append(torch.cat([p["prompt_ids"], torch.tensor(target)]))
            starts.append(len(p["prompt_ids"]))
        ids = torch.nn.utils.rnn.pad_sequence(seqs, batch_first=True, padding_value=tok.pad_token_id)
        labels = ids.clone()
        for row, (start, seq) in enumerate(zip(starts, seqs, strict=True)):
            labels[row, :start] = labels[row, len(seq) :] = -100
        warmup.zero_grad()
        model(input_ids=ids, labels=labels).loss.backward()
        warmup.step()

    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0, betas=(0.9, 0.99))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / cfg.warmup_steps))
    rewards = []
    for step in range(120):
        metrics, _ = stapo.train_step(model, tok, optimizer, problems, step, cfg)
        scheduler.step()
        rewards.append(metrics["reward"])
    curve = [round(sum(rewards[i : i + 10]) / 10, 3) for i in range(0, 120, 10)]
    print("\nmean reward per 10 steps:", curve)
    assert curve[0] <= 0.25 and sum(rewards[-5:]) / 5 >= 0.8
