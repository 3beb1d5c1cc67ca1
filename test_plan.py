"""Tests of the memory arithmetic (stapo.fit, stapo.fit_memory) and of plan.py, on CPU: configs of the
paper's three sizes without weights, and one or two decoder layers built at real width."""

import copy
import math
import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import plan
import stapo

CPU = torch.device("cpu")
QWEN3_SHAPES = {  # the paper's three sizes: hidden, MLP, layers, heads, KV heads, tied embeddings
    "1.7B": dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
                 num_key_value_heads=8, tie_word_embeddings=True),
    "8B": dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
               num_key_value_heads=8, tie_word_embeddings=False),
    "14B": dict(hidden_size=5120, intermediate_size=17408, num_hidden_layers=40, num_attention_heads=40,
                num_key_value_heads=8, tie_word_embeddings=False),
}  # fmt: skip


def qwen3_config(shape: str, **overrides):
    from transformers import Qwen3Config

    return Qwen3Config(**{"vocab_size": 151_936, "head_dim": 128, **QWEN3_SHAPES[shape], **overrides})


@pytest.fixture(scope="module")
def shape_dirs(tmp_path_factory):
    """Folders that hold only a config.json of each of the paper's sizes (dtype bfloat16, as on the Hub)."""
    root = tmp_path_factory.mktemp("shapes")
    for shape in QWEN3_SHAPES:
        qwen3_config(shape, max_position_embeddings=40_960, dtype="bfloat16").save_pretrained(root / shape)
    return root


# ----------------------------------------------------------------------------------------------
# Activations: what autograd keeps, measured at real width


def saved_bytes(config, layers: int, tokens: int) -> int:
    """Bytes of every tensor autograd saves in a forward of a `layers`-deep body (fp32 weights under
    bf16 autocast, zero weights, built on the meta device first), each storage counted once."""
    from transformers import Qwen3Model

    config = copy.deepcopy(config)
    config.num_hidden_layers, config.vocab_size = layers, 16  # the embedding plays no part
    with torch.device("meta"):
        body = Qwen3Model(config)
    body = body.to_empty(device="cpu")
    with torch.no_grad():
        for p in body.parameters():
            p.zero_()
        body.rotary_emb.inv_freq.copy_(body.rotary_emb.compute_default_rope_parameters(config)[0])
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    x = torch.randn(1, tokens, config.hidden_size, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
        body.train()(inputs_embeds=x, use_cache=False)
    return sum(storages.values())


def measured_bytes_per_token_per_layer(config, short: int = 32, long: int = 64) -> float:
    """(2-layer minus 1-layer body) at two lengths: weights and their bf16 copies cancel out."""
    per_layer = {t: saved_bytes(config, 2, t) - saved_bytes(config, 1, t) for t in (short, long)}
    return (per_layer[long] - per_layer[short]) / (long - short)


@pytest.mark.slow
@pytest.mark.parametrize("shape", ["1.7B", "8B"])
def test_activation_bytes_match_saved_tensors_at_real_width(shape):
    config = qwen3_config(shape)
    measured, planned = measured_bytes_per_token_per_layer(config), stapo.activation_bytes_per_token(config)
    print(f"\n{shape}: measured {measured:,.0f} B/token/layer, planned {planned:,}")
    assert planned == pytest.approx(measured, rel=0.10)


def test_activation_bytes_match_saved_tensors_at_a_small_width():
    config = qwen3_config("1.7B", hidden_size=256, intermediate_size=640, num_attention_heads=4,
                          num_key_value_heads=2, head_dim=32)  # fmt: skip
    planned = stapo.activation_bytes_per_token(config)
    assert planned == pytest.approx(measured_bytes_per_token_per_layer(config, 16, 48), rel=0.10)


class LiveBytes(TorchDispatchMode):
    """The bytes of every storage an op creates while the mode is on, as long as it lives, and their peak.
    A bf16 matrix product runs in fp32 and is rounded: CPUs without AVX-512 BF16 take minutes over some bf16 shapes
    (the LM head's backward); the product has the same dtype and size, so the bytes are the same."""

    MATMULS = (torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default)

    def __init__(self):
        super().__init__()
        self.live, self.peak, self.storages = 0, 0, set()

    def freed(self, key, nbytes):
        self.live -= nbytes
        self.storages.discard(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        if func in self.MATMULS and all(t.dtype == torch.bfloat16 for t in tensors):  # a mixed one still fails
            out = func(*(a.float() if isinstance(a, torch.Tensor) else a for a in args), **(kwargs or {})).bfloat16()
        else:
            out = func(*args, **(kwargs or {}))
        inputs = {x.untyped_storage().data_ptr() for x in tree_leaves((args, kwargs)) if isinstance(x, torch.Tensor)}
        for t in (x for x in tree_leaves(out) if isinstance(x, torch.Tensor)):
            storage = t.untyped_storage()  # in-place ops and views return an input's storage: not new
            if storage.data_ptr() and storage.data_ptr() not in self.storages | inputs:
                self.storages.add(storage.data_ptr())
                self.live += storage.nbytes()
                weakref.finalize(storage, self.freed, storage.data_ptr(), storage.nbytes())
        self.peak = max(self.peak, self.live)
        return out


@pytest.mark.slow
@pytest.mark.parametrize(("tied", "checkpointing"), [(False, "off"), (False, "on"), (True, "off")])
def test_the_update_plan_covers_a_micro_batch_backward_at_real_width(tied, checkpointing):
    """One micro-batch's forward and backward at Qwen3-1.7B's width (2 layers, the real vocabulary) under bf16
    autocast, with the gradients a first one leaves in place: its peak is what the plan adds to the update phase
    on top of the fp32 weights, gradients and AdamW states, the LM head's gradient and fp32 cast-back included."""
    from transformers import Qwen3ForCausalLM

    torch.manual_seed(0)
    config = qwen3_config("1.7B", num_hidden_layers=2, tie_word_embeddings=tied)
    cfg = stapo.Config(max_prompt_tokens=64, max_new_tokens=64, micro_batch_tokens=256, precision="bf16-autocast",
                       gradient_checkpointing=checkpointing)  # two sequences of 128 tokens  # fmt: skip
    with torch.device("meta"):
        model = Qwen3ForCausalLM(config)
    model = model.to_empty(device="cpu")
    model.tie_weights()  # to_empty unties them (FSDP2's does not; from_pretrained ties them)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()  # the bytes do not depend on the values
            p.grad = torch.zeros_like(p)  # as a first micro-batch leaves them
        model.model.rotary_emb.inv_freq.copy_(model.model.rotary_emb.compute_default_rope_parameters(config)[0])
    if checkpointing == "on":
        model.gradient_checkpointing_enable()
    prompts = [torch.randint(0, 1000, (64,)) for _ in range(2)]
    rollouts = stapo.Rollouts(prompts, torch.randint(0, 1000, (2, 64)), torch.ones(2, 64, dtype=torch.bool),
                              torch.zeros(2, dtype=torch.bool))  # fmt: skip
    with LiveBytes() as mode:
        logp, _ = stapo.sequence_logp(model.train(), rollouts, [0, 1], cfg)
        logp.sum().backward()
    parts = plan.plan_memory(config, cfg, 1, 80e9, "cpu")
    planned = parts["peak_update"] - parts["weights"] - parts["gradients"] - parts["adamw"]
    measured = f"measured {mode.peak / 1e9:.3f}, planned {planned / 1e9:.3f} GB"
    print(f"\ntied {tied}, checkpointing {checkpointing}: {measured}")
    assert parts["gradient_checkpointing"] == (checkpointing == "on")
    assert planned == pytest.approx(mode.peak, rel=0.05)


# ----------------------------------------------------------------------------------------------
# The decisions a run takes once: checkpointing, the generate batch; and the stop before loading


def test_default_plan_turns_checkpointing_on_only_when_needed(shape_dirs):
    config = qwen3_config("1.7B")
    on = plan.plan_memory(config, stapo.Config())
    assert on["gradient_checkpointing"] and on["peak_update"] <= 72e9
    assert on["activations_full"] > on["activations_checkpointed"] * 5  # why it is needed at 15 k tokens
    one = plan.plan_memory(config, stapo.Config(micro_batch_tokens=5120))  # one sequence per micro-batch fits as is
    assert not one["gradient_checkpointing"] and one["peak_update"] <= 72e9
    forced = plan.plan_memory(config, stapo.Config(gradient_checkpointing="off"))
    assert forced["peak"] > forced["budget"]
    h200 = plan.plan_memory(config, stapo.Config(), device_bytes=141e9)  # the update fits 141 GB as it is
    assert not h200["gradient_checkpointing"] and h200["peak_update"] <= h200["budget"]


def test_the_generate_batch_is_what_the_weights_and_adamw_leave_free(shape_dirs):
    config = qwen3_config("1.7B")
    kv_per_seq = (1024 + 4096) * 2 * 28 * 8 * 128 * 2  # K and V, bf16, every layer
    for gpu_gb, calls in ((80, 4), (141, 2)):
        p = plan.plan_memory(config, stapo.Config(), device_bytes=gpu_gb * 1e9)
        assert p["peak_generation"] <= p["budget"]
        assert p["generate_calls"] == calls and p["generate_batch"] * calls == 256
        assert p["kv_cache"] == p["generate_batch"] * kv_per_seq
    given = plan.plan_memory(config, stapo.Config(generate_batch=27))  # given: 10 calls, filled evenly with 26
    assert given["generate_calls"] == 10 and given["generate_batch"] == 26


GRID = [(prompts, new, gb, world) for prompts in (8, 16, 32) for new in (1024, 4096, 8192) for gb in (24, 80, 141)
        for world in (1, 2) if gb * world > 24]  # fp32 weights, gradients and AdamW of 1.7B need 27.5 GB  # fmt: skip


def resident_and_per_sequence(config, new: int, world: int) -> tuple[float, int]:
    """By hand: the bytes a 1.7B run holds besides generation, and one sequence's in generation."""
    n = stapo.sizes(config)[0]
    resident = 12 * n / world + 2 * n  # fp32 weights and AdamW states, and the bf16 weights to sample from
    per_sequence = (1024 + new) * stapo.kv_bytes_per_token(config, True) + 20 * 151_936 + 1024 * (6 * 6144 + 14 * 2048)
    return resident, per_sequence


@pytest.mark.parametrize(("prompts", "new", "gb", "world"), GRID)
def test_the_generate_batch_is_rounded_once(prompts, new, gb, world):
    """The sequences per call are counted once from bytes (the old plan stored a KV budget in GB and divided it
    again: one sequence short in 8 of 72 settings) and fill as few calls as fit, evenly."""
    config = qwen3_config("1.7B")
    cfg = stapo.Config(prompts_per_step=prompts, max_new_tokens=new, gpu_memory_gb=gb, precision="bf16-autocast")
    fitted, parts = stapo.fit_memory(config, cfg, CPU, world)
    resident, per_sequence = resident_and_per_sequence(config, new, world)
    fits = int((0.9 * gb * 1e9 - resident) // per_sequence)
    rollouts = prompts * 8 // world
    calls = math.ceil(rollouts / max(1, fits))
    assert fitted.generate_batch == max(1, math.ceil(rollouts / calls))
    assert plan.plan_memory(config, cfg, world, gb * 1e9)["generate_batch"] == fitted.generate_batch


@pytest.mark.parametrize(("offset", "batch"), [(-1000, 52), (1000, 64)])
def test_the_generate_batch_is_exact_at_the_edge(offset, batch):
    """1 KB short of the memory of 64 sequences, 63 fit: 256 rollouts in 5 calls of 52; 1 KB over it, 4 calls of
    64. A budget rounded anywhere (to 0.1 GB, say) gives both settings the same answer."""
    config = qwen3_config("1.7B")
    resident, per_sequence = resident_and_per_sequence(config, 4096, 1)
    gb = (64 * per_sequence + offset + resident) / 0.9e9
    cfg = stapo.Config(prompts_per_step=32, max_new_tokens=4096, gpu_memory_gb=gb, precision="bf16-autocast")
    assert stapo.fit_memory(config, cfg, CPU, 1)[0].generate_batch == batch


def test_generate_makes_calls_of_exactly_the_generate_batch(monkeypatch):
    model, tok = stapo.load_policy("tiny", CPU)
    sizes, real = [], type(model).generate

    def recording(self, *args, **kwargs):
        sizes.append(kwargs["input_ids"].shape[0])
        return real(self, *args, **kwargs)

    monkeypatch.setattr(type(model), "generate", recording)
    prompts = [stapo.encode_prompt("1+1?", tok)] * 10
    for batch, expected in ((3, [3, 3, 3, 1]), (10, [10]), (0, [10]), (31, [10])):
        sizes.clear()
        stapo.generate(model, tok, prompts, stapo.Config(model="tiny", max_new_tokens=2, generate_batch=batch))
        assert sizes == expected


def test_a_run_whose_weights_and_adamw_alone_do_not_fit_stops_before_loading(shape_dirs, tmp_path, capsys):
    flags = ["--model", str(shape_dirs / "8B"), "--gpu-memory-gb", "80", "--output-dir", str(tmp_path / "run")]
    with pytest.raises(SystemExit) as exit_info:  # the folder has no weights: loading them would fail otherwise
        stapo.main(flags)
    message = str(exit_info.value.code)
    assert "AdamW states alone need 131.1 GB per process, more than the 72.0 GB" in message and "plan.py" in message
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------------------------
# plan.py: the table, and what would fit


@pytest.mark.parametrize("shape", QWEN3_SHAPES)
def test_the_plan_prints_from_a_config_alone(shape_dirs, shape, capsys):
    code = plan.main(["--model", str(shape_dirs / shape)])
    out = capsys.readouterr().out
    p = plan.plan_memory(qwen3_config(shape), stapo.Config())
    assert "generation" in out and "activations of a micro-batch" in out and f"{p['peak'] / 1e9:.1f}" in out
    assert "LM head in backward" in out
    if shape == "1.7B":  # the default command fits 90 % of an 80 GB GPU
        assert p["peak"] <= 72e9 and "(fits)" in out and code == 0
    else:  # fp32 weights, gradients and AdamW states alone exceed one GPU
        assert p["weights"] * 4 > 80e9 and "DOES NOT FIT" in out and code == 1 and "these fit:" in out


def test_the_plan_of_one_rank_under_torchrun(shape_dirs, capsys):
    plan.main(["--model", str(shape_dirs / "8B"), "--gpus", "8"])
    out = capsys.readouterr().out
    assert "8 GPU(s)" in out and "(fits)" in out
    with pytest.raises(SystemExit):  # 32 prompts do not split over 64 GPUs
        plan.main(["--model", str(shape_dirs / "8B"), "--gpus", "64"])


def test_the_plan_suggests_combinations_says_why_nothing_fits_and_no_gpus_on_a_cpu():
    config = {shape: qwen3_config(shape) for shape in QWEN3_SHAPES}
    cfg = stapo.Config()
    # 8B on 8 x 24 GB: no single change fits 8 GPUs; the fewest GPUs with a smaller micro-batch, not 64 GPUs
    eight = plan.fixes_that_fit(config["8B"], cfg, 8, 24e9, "cuda")
    assert eight.startswith("these fit: --micro-batch-tokens") and "64 GPUs" not in eight
    # 14B at 24 GB: the whole bf16 model must sit on each GPU for the rollouts, whatever else changes
    fourteen = plan.fixes_that_fit(config["14B"], cfg, 1, 24e9, "cuda")
    assert fourteen.startswith("nothing fits") and "weights for sampling (bf16 / FSDP) 29.5 GB" in fourteen
    # a fix that fits by cutting generation into many small calls says so
    assert "generate calls of" in plan.fixes_that_fit(config["1.7B"], cfg, 1, 24e9, "cuda")
    cpu = plan.fixes_that_fit(config["1.7B"], cfg, 1, 16e9, "cpu")  # 16 GB of RAM: no GPU to add
    assert cpu.startswith("nothing fits") and "GPU" not in cpu and "AdamW states" in cpu


def test_a_mixture_of_experts_is_refused():
    from transformers import Qwen3MoeConfig

    with pytest.raises(SystemExit, match="mixture of experts"):
        plan.plan_memory(Qwen3MoeConfig(), stapo.Config())
