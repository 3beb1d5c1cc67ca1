"""The self-check of bench.py on CPU: one training step measured against the plan, its KV cache read, offline."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

import bench
import stapo
from test_stapo import WITHOUT_DATASETS

HERE = Path(__file__).parent


@pytest.mark.slow  # 5 s: bench.py --gpu in a subprocess
def test_self_check_on_cpu_measures_bf16_keys_and_values():
    """The command a user runs, as a user runs it, with no network and no `datasets`: on CPU the tiny model under
    bf16 autocast."""
    command = [sys.executable, "-c", WITHOUT_DATASETS, "bench.py", "--gpu", "--device", "cpu"]
    run = subprocess.run(command, cwd=HERE, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    for phase in ("generation", "scoring", "update"):
        assert any(line.startswith(phase) and "n/a" in line for line in run.stdout.splitlines()), phase
    assert "decode: 4 sequences x 16 steps in 1 call(s)" in run.stdout  # random weights run to --max-new-tokens
    assert "keys bfloat16, values bfloat16; 256 bytes measured, 256 planned: match" in run.stdout
    assert "extrapolated, a step of the default command" in run.stdout


@pytest.mark.parametrize(
    "flags, planned_bytes, line, code",
    [
        (["--precision", "fp32"], None, "keys float32, values float32; 512 bytes measured, 512 planned: match", 0),
        (["--gradient-checkpointing", "on"], None, "256 bytes measured, 256 planned: match", 0),  # old or new name
        ([], 100, "keys bfloat16, values bfloat16; 256 bytes measured, 100 planned: MISMATCH", 1),  # a wrong plan
    ],
)  # fmt: skip
def test_self_check_compares_kv_bytes_with_the_plan(monkeypatch, capsys, flags, planned_bytes, line, code):
    if planned_bytes is not None:
        monkeypatch.setattr(stapo, "kv_bytes_per_token", lambda config, bf16: planned_bytes)
    assert bench.self_check(["--device", "cpu", "--max-new-tokens", "4", *flags]) == code
    assert line in capsys.readouterr().out


def test_the_default_model_is_built_from_its_config_without_a_request(monkeypatch, capsys):
    """The default model (Qwen3-1.7B-Base) is the shape written in bench.py: no Hub, no tokenizer download. Here
    the same path at a width a CPU runs quickly."""
    import huggingface_hub

    monkeypatch.setitem(bench.QWEN3_1_7B, "hidden_size", 64)
    monkeypatch.setitem(bench.QWEN3_1_7B, "intermediate_size", 128)
    monkeypatch.setitem(bench.QWEN3_1_7B, "num_hidden_layers", 2)
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", lambda *a, **k: pytest.fail("the Hub was asked"))
    flags = ["--device", "cpu", "--model", stapo.Config.model, "--max-new-tokens", "4", "--max-prompt-tokens", "16"]
    assert bench.self_check(flags) == 0
    out = capsys.readouterr().out
    assert "Qwen/Qwen3-1.7B-Base: random weights" in out and "planned: match" in out


def test_a_phase_over_its_plan_and_a_config_that_cannot_be_had_exit_differently(monkeypatch, capsys):
    step = stapo.train_step

    def over(*args, **kwargs):  # the real step, its update's peak then reported far above the plan
        metrics, records = step(*args, **kwargs)
        return metrics | {"generation_gb": 0.0, "scoring_gb": 0.0, "update_gb": 1e6}, records

    monkeypatch.setattr(stapo, "train_step", over)
    assert bench.self_check(["--device", "cpu", "--max-new-tokens", "4"]) == 1
    assert "OVER PLAN" in capsys.readouterr().out
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    assert bench.self_check(["--device", "cpu", "--model", "nobody/no-such-model"]) == 3  # the documented code
    assert "--model nobody/no-such-model: no local file or folder of that name here" in capsys.readouterr().err


@pytest.mark.slow  # 12 s: two subprocess runs of the check
def test_the_prepared_gpu_check_runs_its_flow_on_cpu(tmp_path, monkeypatch):
    """python bench.py --gpu-check --device cpu: the environment, the self-check at the defaults and at the full
    shape, each output in one folder with a summary; the same flow a GPU runs, on the tiny model."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert bench.gpu_check(["--device", "cpu", "--out", str(tmp_path)]) == 0
    summary = (tmp_path / "summary.md").read_text()
    assert summary.count("planned: match") == 2 and summary.count("extrapolated") == 2
    assert {p.name for p in tmp_path.iterdir()} >= {"environment.txt", "default.json", "full-shape.json", "summary.md"}
    monkeypatch.setitem(bench.FLOORS, "torch", (99, 0))  # an image below the floors is named, before any run
    assert bench.gpu_check(["--device", "cpu", "--out", str(tmp_path / "old")]) == 4
    assert "torch 2" in (tmp_path / "old" / "environment.txt").read_text()
