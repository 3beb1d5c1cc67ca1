"""The self-check of bench.py on CPU: one training step of the tiny model, its KV cache measured."""

import subprocess
import sys
from pathlib import Path

import pytest

import bench
import stapo


def test_self_check_on_cpu_measures_bf16_keys_and_values():
    """The command a user runs, as a user runs it: on CPU the tiny model under bf16 autocast."""
    run = subprocess.run([sys.executable, "bench.py", "--gpu", "--device", "cpu"], cwd=Path(__file__).parent,
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    for phase in ("generation", "scoring", "update", "optimizer step"):
        assert any(line.startswith(phase) and "n/a" in line for line in run.stdout.splitlines()), phase
    assert "decode: 4 sequences x 16 steps" in run.stdout  # P=2, G=2: random weights run to --max-new-tokens
    assert "keys bfloat16, values bfloat16; 256 bytes measured, 256 planned: match" in run.stdout


@pytest.mark.parametrize(
    "flags, planned_bytes, line, code",
    [
        (["--precision", "fp32"], None, "keys float32, values float32; 512 bytes measured, 512 planned: match", 0),
        ([], 100, "keys bfloat16, values bfloat16; 256 bytes measured, 100 planned: MISMATCH", 1),  # a wrong plan
    ],
)  # fmt: skip
def test_self_check_compares_kv_bytes_with_the_plan(monkeypatch, capsys, flags, planned_bytes, line, code):
    if planned_bytes is not None:
        monkeypatch.setattr(stapo, "kv_bytes_per_token", lambda config, bf16: planned_bytes)
    assert bench.self_check(["--device", "cpu", "--max-new-tokens", "4", *flags]) == code
    assert line in capsys.readouterr().out
