"""Tests for eval.py on CPU with a tiny random Qwen3: `pytest -q test_eval.py`."""

import hashlib
import itertools
import json
import random
import re
import shutil
import sys
import time
import types
import weakref
from pathlib import Path

import pytest
import torch

import eval as ev
import plan
import stapo

QUIRKY_ROWS = {
    "aime24": [{"id": 60, "problem": "p0", "question": "p0", "solution": "s", "answer": "025", "url": "u"},
               {"id": 61, "problem": "p1", "question": "p1", "solution": "s", "answer": "204", "url": "u"}],
    "aime25": [{"problem": "Find \x0crac{1}{2} of \triangle ABC.", "answer": "7"}, {"problem": "q", "answer": "8"}],
    "amc23": [{"id": 0, "problem": "p", "question": "p", "answer": 27.0, "url": "u"},
              {"id": 1, "problem": "p", "question": "p", "answer": -1.0, "url": "u"}],
    "math500": [{"problem": "p", "solution": r"\boxed{\frac{1}{2}}", "answer": r"\frac{1}{2}", "subject": "s",
                 "level": 1, "unique_id": "a"},
                {"problem": "p", "solution": r"\boxed{3}", "answer": "3", "subject": "s", "level": 1,
                 "unique_id": "b"}],
    "minerva": [{"problem": "p", "solution": r"First \boxed{1}, then \boxed{4.5e33}.", "type": "t", "idx": 0},
                {"problem": "p", "solution": r"\boxed{0.49}", "type": "t", "idx": 1}],
    "olympiadbench": [{"id": 1, "question": "p", "final_answer": ["$2n-2$"], "is_multiple_answer": False},
                      {"id": 2, "question": "p", "final_answer": ["2"], "is_multiple_answer": False}],
}  # fmt: skip


@pytest.fixture
def data_dir(tmp_path):
    folder = tmp_path / "bench"
    folder.mkdir()
    for name, rows in QUIRKY_ROWS.items():
        (folder / ev.BENCHMARKS[name].file).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def jsonl(*rows) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def record(benchmark: str, problem: int, sample: int, correct: bool = True, **fields) -> dict:
    """A generation record as eval.py writes it."""
    return {"benchmark": benchmark, "problem_idx": problem, "sample_idx": sample, "gold": "1",
            "extracted": "1" if correct else "2", "correct": correct, "length": 10, "truncated": False,
            "completion": f"\\boxed{{{1 if correct else 2}}}", **fields}  # fmt: skip


TORN = b'{"benchmark": "aime24", "problem_idx": 0, "sam'  # what a kill during an append leaves


def eval_args(data_dir, out, *extra):  # 3 tiny fp32 sequences per generate call
    return ["--model", "tiny", "--data-dir", str(data_dir), "--samples", "3", "--max-new-tokens", "12",
            "--generate-batch", "3", "--output-dir", str(out), *extra]  # fmt: skip


# ----------------------------------------------------------------------------------------------
# Benchmark files


@pytest.mark.parametrize(
    ("name", "index", "problem", "answer"),
    [
        ("aime24", 0, "p0", "025"),  # zero-padded gold kept; the verifier compares it as 25
        ("aime25", 0, "Find \\frac{1}{2} of \\triangle ABC.", "7"),  # eaten \f and \t escapes restored
        ("amc23", 0, "p", "27"),  # float gold 27.0
        ("amc23", 1, "p", "-1"),  # negative float gold
        ("minerva", 0, "p", "4.5e33"),  # no answer field: the last \boxed{} of the solution
        ("olympiadbench", 0, "p", "2n-2"),  # list-valued final_answer, $ stripped
    ],
)
def test_benchmark_quirks(data_dir, name, index, problem, answer):
    example = ev.load_benchmark(name, data_dir)[index]
    assert example == {"problem": problem, "answer": answer}
    assert stapo.verify(f"\\boxed{{{answer}}}", QUIRKY_ROWS[name][index].get("answer", answer))


def test_unknown_benchmark_lists_the_known_ones():
    with pytest.raises(SystemExit, match="unknown benchmark 'gsm8k'; known: aime24, aime25"):
        ev.main(["--model", "tiny", "--benchmarks", "gsm8k"])


AMC_ROW = {"id": 0, "problem": "p", "question": "p", "answer": 27.0, "url": "u"}


@pytest.mark.parametrize(
    ("amc23", "error"),
    [
        (jsonl(AMC_ROW) + b'{"id": 1, "problem": "p",\n', r"line 2: not a JSON object \(Expecting"),
        (jsonl(AMC_ROW) + '{"problem": "caf\xe9"}\n'.encode("latin-1"), r"line 2: .*can't decode byte 0xe9"),
        (jsonl(AMC_ROW, ["p", 3]), r"line 2: not a JSON object \(a JSON list\)"),
        (jsonl(AMC_ROW) + b'{"id": 1', r"line 2: not a JSON object"),  # a benchmark file has no torn tail to drop
        (jsonl(AMC_ROW, {"id": 1, "problem": "p", "url": "u"}), r"row 2: no .* answer \(fields: id, problem, url\)"),
        (jsonl(AMC_ROW, {"id": 1, "problem": "p", "answer": "$ $"}), "row 2: no .* usable answer"),  # empty once $ go
        (jsonl(AMC_ROW, {"id": 1, "answer": 3}), "row 2: no problem text"),
        (b"\n", "no problems"),  # was a ZeroDivisionError after loading the model
    ],
)
def test_malformed_benchmark_file_names_file_and_line(data_dir, tmp_path, amc23, error):
    (data_dir / "amc23.jsonl").write_bytes(amc23)
    with pytest.raises(SystemExit, match=error) as e:
        ev.main(eval_args(data_dir, tmp_path / "out", "--benchmarks", "amc23"))
    assert str(e.value).startswith(f"{data_dir / 'amc23.jsonl'}: ") and "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()  # checked before a run folder is made


@pytest.fixture
def offline(monkeypatch):
    """No Hub: what HF_HUB_OFFLINE=1 gives (stapo.loading asks nothing, and restores nothing: monkeypatch does)."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


def test_the_shipped_benchmarks_are_the_default():
    assert ev.parse_args(["--model", "tiny"]).data_dir == ev.BENCHMARK_DIR
    assert [len(ev.load_benchmark(name)) for name in ev.BENCHMARKS] == [30, 30, 40, 500, 272, 675]


def test_data_dir_hub_offline_is_one_line_naming_it(tmp_path, monkeypatch, offline):
    def load_dataset(path, split):  # what datasets raises offline for a set it has not cached
        raise ConnectionError(f"Couldn't reach '{path}' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    with pytest.raises(SystemExit, match=r"^amc23: --data-dir hub: math-ai/amc23: .*HF_HUB_OFFLINE") as e:
        ev.main(["--model", "tiny", "--benchmarks", "amc23", "--data-dir", "hub", "--output-dir", str(tmp_path / "r")])
    assert "\n" not in str(e.value) and not (tmp_path / "r").exists()  # was a traceback from datasets


def test_a_data_dir_without_the_files_is_named(tmp_path):
    with pytest.raises(SystemExit, match=r"amc23.jsonl not found: --data-dir must hold aime24.jsonl, .* \(or be hub\)"):
        ev.main(["--model", "tiny", "--benchmarks", "amc23", "--data-dir", str(tmp_path),
                 "--output-dir", str(tmp_path / "run")])  # fmt: skip  # not evals/, which a user's run may hold


# ----------------------------------------------------------------------------------------------
# Metrics and --score


@pytest.mark.parametrize(("n", "c"), [(1, 0), (1, 1), (4, 1), (4, 2), (5, 3), (6, 0), (6, 6)])
def test_pass_at_k_matches_enumeration(n, c):
    outcomes = [True] * c + [False] * (n - c)
    for k in range(1, n + 1):
        subsets = list(itertools.combinations(outcomes, k))
        assert ev.pass_at_k(n, c, k) == pytest.approx(sum(any(s) for s in subsets) / len(subsets))


def test_score_a_handwritten_generations_file(tmp_path, capsys):
    # aime24: problem 0 right in 1 of 4 samples, problem 1 in 2 of 4; math500: one problem, 2 samples, no box once
    outcomes = {0: [1, 0, 0, 0], 1: [1, 1, 0, 0]}
    rows = [record("aime24", p, j, bool(c)) for p, cs in outcomes.items() for j, c in enumerate(cs)]
    rows += [record("math500", 0, 0, True, length=4),
             record("math500", 0, 1, False, extracted=None, length=8, truncated=True)]  # fmt: skip
    path = tmp_path / "generations.jsonl"
    path.write_bytes(jsonl(*rows))
    ev.main(["--score", str(path)])
    results = json.loads((tmp_path / "generations.score-rules.json").read_text())
    aime = results["aime24"]
    assert aime["avg@4"] == 3 / 8
    assert aime["pass@1"] == pytest.approx((1 / 4 + 2 / 4) / 2)
    assert aime["pass@2"] == pytest.approx(((1 - 3 / 6) + (1 - 1 / 6)) / 2)  # 1 - C(3,2)/C(4,2), 1 - C(2,2)/C(4,2)
    assert aime["pass@4"] == 1.0
    m = results["math500"]
    assert (m["avg@2"], m["pass@2"], m["no_box"], m["mean_length"], m["truncated"]) == (0.5, 1.0, 0.5, 6, 0.5)
    assert results["Avg"] == pytest.approx((3 / 8 + 1 / 2) / 2)
    assert "| aime24 | 2 | 37.5 (k=4) | 37.5 | 66.7 | 100.0 |" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("content", "error"),
    [
        (b"", "no records: not a generations file of eval.py"),  # empty: was "Avg 0.0", exit 0
        (b"\n\n", "no records"),  # blank lines only
        (TORN, "no records"),  # the only line is torn: nothing is left to score
        (b"benchmark,problem_idx,correct\naime24,0,1\n", "line 1: not a JSON object"),  # a CSV
        (b"\x89PNG\r\n\x1a\n\x00\x00", r"line 1: not a JSON object \('utf-8' codec can't decode byte 0x89"),  # binary
        (jsonl({"problem": "p", "answer": "1"}), r"line 1: not a generation record .*\['benchmark', 'problem_idx'"),
        (jsonl(record("aime24", 0, 0), [1, 2]), r"line 2: not a JSON object \(a JSON list\)"),
        (jsonl(record("gsm8k", 0, 0)), "line 1: unknown benchmark 'gsm8k'"),
        (jsonl(record("aime24", 0, 0, correct="yes")), r"line 1: .*mistyped: \['correct'\]"),
        (jsonl(record("aime24", 0, 0)) + TORN + b"\n" + jsonl(record("aime24", 0, 1)), "line 2: not a"),  # mid-file
    ],
)
def test_score_rejects_what_is_not_a_generations_file(tmp_path, content, error):
    path = tmp_path / "generations.jsonl"
    path.write_bytes(content)
    with pytest.raises(SystemExit, match=error) as e:
        ev.main(["--score", str(path)])
    assert str(e.value).startswith(f"{path}: ") and "\n" not in str(e.value)
    assert list(tmp_path.iterdir()) == [path]  # no tables written


def test_score_refuses_a_sample_written_twice(tmp_path):
    path = tmp_path / "generations.jsonl"
    path.write_bytes(jsonl(record("aime24", 0, 0, True), record("aime24", 0, 1, False), record("aime24", 0, 0, True)))
    with pytest.raises(SystemExit, match=r"line 3 repeats \('aime24', 0, 0\) of line 1"):  # was counted twice
        ev.main(["--score", str(path)])


def test_score_drops_a_torn_last_line_with_a_warning(tmp_path, capsys):
    path = tmp_path / "generations.jsonl"
    path.write_bytes(jsonl(record("aime24", 0, 0, True), record("aime24", 0, 1, False)) + TORN)
    ev.main(["--score", str(path)])
    assert f"warning: {path}: line 3 is cut short" in capsys.readouterr().err
    assert json.loads((tmp_path / "generations.score-rules.json").read_text())["aime24"]["avg@2"] == 0.5


def test_score_writes_beside_its_input_without_touching_the_runs_results(tmp_path, capsys):
    (tmp_path / "results.md").write_text("a run made with other settings\n")
    path = tmp_path / "generations.jsonl"
    path.write_bytes(jsonl(record("aime24", 0, 0)))
    ev.main(["--score", str(path)])
    assert (tmp_path / "results.md").read_text() == "a run made with other settings\n"
    table, wrote = capsys.readouterr().out.rsplit("\n", 2)[:2]  # the table, then where it went
    assert (tmp_path / "generations.score-rules.md").read_text() == table + "\n"
    assert wrote == f"wrote {tmp_path / 'generations.score-rules.md'} and {tmp_path / 'generations.score-rules.json'}"
    assert sorted(f.name for f in tmp_path.iterdir()) == [
        "generations.jsonl", "generations.score-rules.json", "generations.score-rules.md", "results.md"]  # fmt: skip


# ----------------------------------------------------------------------------------------------
# Runs: resume, settings, progress


def test_eval_run_then_interrupted_run_resumes_to_the_same_table(data_dir, tmp_path):
    table = ev.main(eval_args(data_dir, tmp_path / "full")) or (tmp_path / "full" / "results.md").read_text()
    full = (tmp_path / "full" / "generations.jsonl").read_text().splitlines()
    assert len(full) == 6 * 2 * 3 and "| olympiadbench | 2 |" in table
    assert json.loads((tmp_path / "full" / "results.json").read_text())["aime24"]["samples"] == 3

    # a crash after 10 samples, the last line torn in half
    (tmp_path / "cut").mkdir()
    (tmp_path / "cut" / "generations.jsonl").write_text("\n".join(full[:10]) + "\n" + full[10][:30])
    ev.main(eval_args(data_dir, tmp_path / "cut"))
    resumed = (tmp_path / "cut" / "generations.jsonl").read_text().splitlines()
    key = lambda r: (r["benchmark"], r["problem_idx"], r["sample_idx"])  # noqa: E731
    assert len(resumed) == len(full) and len({key(json.loads(r)) for r in resumed}) == len(full)
    assert sorted(resumed) == sorted(full)  # same samples, so the same table
    assert (tmp_path / "cut" / "results.md").read_text() == (tmp_path / "full" / "results.md").read_text()


A, B = record("aime24", 0, 0), record("aime24", 0, 1)


@pytest.mark.parametrize(
    ("before", "after"),
    [
        (jsonl(A, B), jsonl(A, B)),  # whole: left alone
        (jsonl(A) + TORN, jsonl(A)),  # torn last line: dropped
        (jsonl(A) + json.dumps(B).encode(), jsonl(A, B)),  # cut between "}" and its newline: the record stays
        (TORN, b""),  # killed during the first append
        (b"", b""),  # killed before it
    ],
)
def test_resume_keeps_whole_records_and_drops_a_torn_line(tmp_path, before, after):
    (tmp_path / "generations.jsonl").write_bytes(before)
    gen_path, have = ev.open_run(tmp_path, {"model": "tiny"})
    assert gen_path.read_bytes() == after
    kept = [json.loads(line) for line in after.splitlines()]
    assert have == {(r["benchmark"], r["problem_idx"], r["sample_idx"]): r["correct"] for r in kept}


def test_a_crash_while_dropping_a_torn_line_leaves_the_file_as_it_was(tmp_path, monkeypatch):
    def crash(src, dst):
        raise OSError("disk gone")  # the moment the old code had truncated the file and not yet rewritten it

    (tmp_path / "generations.jsonl").write_bytes(jsonl(A, B) + TORN)
    monkeypatch.setattr(stapo.os, "replace", crash)  # eval writes through stapo.replace_file
    with pytest.raises(OSError, match="disk gone"):
        ev.open_run(tmp_path, {"model": "tiny"})
    assert (tmp_path / "generations.jsonl").read_bytes() == jsonl(A, B) + TORN
    assert sorted(f.name for f in tmp_path.iterdir()) == ["generations.jsonl", "settings.json"]  # no temp file left

    (tmp_path / "generations.jsonl").write_bytes(jsonl(A, B))
    assert ev.open_run(tmp_path, {"model": "tiny"})[1] == {("aime24", 0, 0): True, ("aime24", 0, 1): True}  # no rewrite


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    """An amc23 run of 2 problems x 3 samples, and the data folder it read."""
    folder = tmp_path_factory.mktemp("first")
    (folder / "bench").mkdir()
    (folder / "bench" / "amc23.jsonl").write_bytes(jsonl(*QUIRKY_ROWS["amc23"]))
    ev.main(eval_args(folder / "bench", folder / "run", "--benchmarks", "amc23"))
    return folder / "bench", folder / "run"


@pytest.mark.parametrize("gpus", [0, 1])
def test_a_device_the_machine_lacks_is_named(data_dir, tmp_path, monkeypatch, gpus):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    with pytest.raises(SystemExit, match=f"--device cuda:{gpus}: this machine has {gpus} CUDA devices"):
        ev.main(eval_args(data_dir, tmp_path / "run", "--device", f"cuda:{gpus}"))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("flag", "value", "setting"),
    [
        ("--model", "Qwen/Qwen3-1.7B", "model"),
        ("--preset", "t0.7", "temperature"),
        ("--temperature", "0.5", "temperature"),
        ("--top-p", "0.9", "top_p"),
        ("--max-new-tokens", "8", "max_new_tokens"),
        ("--seed", "1", "seed"),
        ("--prompt-format", "plain", "prompt_format"),
        ("--samples", "2", "samples"),
        ("--limit", "1", "limit"),  # a shorter queue is cut into other calls
        ("--data-dir", "copy", "data"),  # the same files in another folder: maybe not the same files next time
        ("--precision", "bf16", "precision"),
        ("--generate-batch", "2", "sequences_per_call"),  # cuts the queue into other generate calls
        ("--generate-batch", "0", "sequences_per_call"),  # automatic: what the memory plan leaves free
        ("--grader", "both", "grader"),  # the same samples, but results.md would change its meaning
    ],
)
def test_eval_refuses_to_mix_settings(first_run, tmp_path, flag, value, setting):
    if flag == "--grader":
        pytest.importorskip("math_verify")  # installed in CI; without it the run stops earlier, at the import
    bench, run = first_run
    shutil.copytree(run, tmp_path / "run")
    if value == "copy":
        value = str(shutil.copytree(bench, tmp_path / "bench"))
    with pytest.raises(SystemExit, match=rf"holds a run with other settings \({setting} .* -> .*\): pick another"):
        ev.main(eval_args(bench, tmp_path / "run", "--benchmarks", "amc23", flag, value))
    assert (tmp_path / "run" / "settings.json").read_text() == (run / "settings.json").read_text()


def test_eval_says_where_it_writes_then_one_line_per_finished_benchmark(data_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # a relative --output-dir is reported as an absolute path
    ev.main(eval_args(data_dir, "run", "--benchmarks", "amc23,aime24"))
    out = capsys.readouterr().out.splitlines()
    assert re.fullmatch(r"plan: tiny weights 0.0 GB \(fp32\) \+ KV 0.0 GB \+ sampler 0.0 GB for 3 sequences of "
                        r"105 tokens per generate call = 0.0 GB of \d+.\d GB \(fits\)", out[0])  # fmt: skip
    assert out[1] == f"eval: writing to {(tmp_path / 'run').resolve()}"
    records = [json.loads(line) for line in (tmp_path / "run" / "generations.jsonl").read_text().splitlines()]
    for line, name in zip(out[2:4], ["amc23", "aime24"], strict=True):
        avg = 100 * sum(r["correct"] for r in records if r["benchmark"] == name) / 6
        assert re.fullmatch(rf"{name} \| 2 problems x 3 samples \| avg@3 {avg:.1f} \(rules\) \| \d+s", line)
    assert out[4].startswith("| benchmark | problems | avg@k |")


# ----------------------------------------------------------------------------------------------
# Sampling: the memory plan, one queue per benchmark, precision and presets


@pytest.fixture
def generate_calls(monkeypatch):
    """What eval passes to each stapo.generate call, which still runs."""
    calls, real = [], stapo.generate

    def recording(model, tokenizer, prompts, cfg, desc="rollouts"):
        calls.append({"cfg": cfg, "dtypes": {p.dtype for p in model.parameters()}, "prompts": list(map(len, prompts))})
        return real(model, tokenizer, prompts, cfg, desc)

    monkeypatch.setattr(stapo, "generate", recording)
    return calls


def test_dry_run_plans_qwen3_14b_on_one_80gb_gpu(tmp_path, capsys):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    folder = tmp_path / "Qwen3-14B"
    Qwen3Config(vocab_size=151_936, hidden_size=5120, intermediate_size=17408, num_hidden_layers=40,
                num_attention_heads=40, num_key_value_heads=8, head_dim=128,
                tie_word_embeddings=False).save_pretrained(folder)  # fmt: skip
    argv = ["--model", str(folder), "--max-new-tokens", "20480", "--gpu-memory-gb", "80"]
    sizing = ev.eval_plan(ev.parse_args(argv), None, 1024)  # None: a GPU, as --dry-run plans for
    per_sequence = (sizing["kv_cache"] + sizing["sampling"]) / sizing["sequences_per_call"]
    with torch.device("meta"):  # the real parameter count, no memory
        parameters = sum(p.numel() for p in Qwen3ForCausalLM(Qwen3Config.from_pretrained(folder)).parameters())
    assert sizing["bf16"] and sizing["weights"] == 2 * parameters
    assert sizing["total"] <= 72e9 < sizing["total"] + per_sequence  # fits 90 % of 80 GB, as many sequences as fit
    ev.main([*argv, "--dry-run"])
    out = capsys.readouterr().out
    assert out == plan.eval_plan_line(sizing, "Qwen3-14B") + "\n" and "(bf16)" in out and out.endswith("(fits)\n")


def test_a_plan_that_does_not_fit_is_refused_before_a_run_folder(data_dir, tmp_path):
    with pytest.raises(SystemExit, match=r"^plan: tiny weights .*\(DOES NOT FIT\): refused; try --generate-batch 0 or "
                       "--precision bf16 or a shorter --max-new-tokens or more memory") as e:  # fmt: skip
        ev.main(eval_args(data_dir, tmp_path / "run", "--gpu-memory-gb", "0.0001"))  # 0.1 MB: not the weights
    assert "\n" not in str(e.value) and not (tmp_path / "run").exists()


def test_one_queue_per_benchmark_sorted_by_prompt_length_and_cut_evenly(data_dir, tmp_path, generate_calls):
    # aime25: problem 0's prompt is 125 tokens, problem 1's 92; 8 samples, 3 fit a call -> 3 calls of 2, 3, 3
    ev.main(eval_args(data_dir, tmp_path / "run", "--benchmarks", "aime25", "--samples", "4"))
    assert [c["prompts"] for c in generate_calls] == [[92, 92], [92, 92, 125], [125, 125, 125]]
    assert all(c["cfg"].generate_batch >= len(c["prompts"]) for c in generate_calls)  # each one call of HF generate
    records = [json.loads(line) for line in (tmp_path / "run" / "generations.jsonl").read_text().splitlines()]
    assert [(r["problem_idx"], r["sample_idx"]) for r in records] == [(i, j) for i in (1, 0) for j in range(4)]


def test_generate_batch_0_puts_as_many_sequences_in_a_call_as_the_plan_allows(data_dir, tmp_path, generate_calls):
    argv = eval_args(data_dir, tmp_path / "run", "--benchmarks", "amc23", "--samples", "5", "--generate-batch", "0",
                     "--gpu-memory-gb", "0.0012")  # fmt: skip
    ev.main(argv)
    n = ev.eval_plan(ev.parse_args(argv), torch.device("cpu"), 92)["sequences_per_call"]  # prompts of 92 tokens
    calls = -(-10 // n)  # 2 problems x 5 samples in as few calls as fit, evenly filled
    assert 1 < n < 10 and [len(c["prompts"]) for c in generate_calls] == [(c + 1) * 10 // calls - c * 10 // calls
                                                                          for c in range(calls)]  # fmt: skip


def test_the_plan_counts_no_more_sequences_than_there_are_to_sample(data_dir, tmp_path, generate_calls, capsys):
    argv = eval_args(data_dir, tmp_path / "run", "--benchmarks", "amc23", "--samples", "3", "--generate-batch", "0")
    assert ev.eval_plan(ev.parse_args(argv), torch.device("cpu"), 92)["sequences_per_call"] > 6  # CPU RAM: thousands
    ev.main(argv)
    assert "for 6 sequences of" in capsys.readouterr().out  # 2 problems x 3 samples, not what the RAM would hold
    assert [len(c["prompts"]) for c in generate_calls] == [6]


@pytest.mark.parametrize(
    ("flags", "temperature", "top_p"),
    [
        ([], 1.0, 1.0),  # t1.0, training-aligned
        (["--preset", "t0.7"], 0.7, 0.9),
        (["--preset", "t0.7", "--temperature", "0.5"], 0.5, 0.9),  # a flag overrides its half of the preset
    ],
)
def test_the_sampler_gets_the_presets_temperature_and_top_p(data_dir, tmp_path, generate_calls, flags, temperature,
                                                             top_p):  # fmt: skip
    ev.main(eval_args(data_dir, tmp_path / "run", "--benchmarks", "amc23", "--limit", "1", "--samples", "1", *flags))
    assert [(c["cfg"].temperature, c["cfg"].top_p) for c in generate_calls] == [(temperature, top_p)]


@pytest.mark.parametrize(("precision", "dtype"), [("auto", torch.float32), ("bf16", torch.bfloat16)])  # auto: CPU fp32
def test_precision_is_the_dtype_of_the_weights(data_dir, tmp_path, capsys, generate_calls, precision, dtype):
    flags = ["--benchmarks", "amc23", "--samples", "2", "--precision", precision, "--device", "cpu"]
    ev.main(eval_args(data_dir, tmp_path / "run", *flags))  # bf16: loaded in bf16, no fp32 copy, sampled from as is
    assert generate_calls and all(c["dtypes"] == {dtype} for c in generate_calls)
    assert f"({'bf16' if dtype == torch.bfloat16 else 'fp32'}) + KV" in capsys.readouterr().out.splitlines()[0]
    assert json.loads((tmp_path / "run" / "results.json").read_text())["amc23"]["samples"] == 2


# ----------------------------------------------------------------------------------------------
# Flags


@pytest.mark.parametrize(
    ("flag", "value", "allowed"),
    [
        ("--limit", "-29", "give a whole number >= 1"),  # was "all but the last 29 problems"
        ("--limit", "0", "give a whole number >= 1"),
        ("--samples", "0", "give a whole number >= 1"),  # was the paper's 32 or 4
        ("--samples", "2.5", "give a whole number >= 1"),
        ("--max-new-tokens", "-1", "give a whole number >= 1"),
        ("--temperature", "0", "give a number > 0"),
        ("--temperature", "nan", "give a number > 0"),
        ("--generate-batch", "-1", "give a whole number >= 0"),
        ("--generate-batch", "1.5", "give a whole number >= 0"),
        ("--device", "cuda:x", "give auto, cpu, cuda or cuda:N"),  # was a ValueError traceback
        ("--gpu-memory-gb", "0", "give a number > 0"),
        ("--top-p", "0", "give a number in (0, 1]"),
        ("--top-p", "1.5", "give a number in (0, 1]"),
        ("--precision", "bf16-autocast", "invalid choice: 'bf16-autocast'"),  # eval has no fp32 weights to cast
    ],
)
def test_flags_refuse_values_outside_their_range(capsys, flag, value, allowed):
    with pytest.raises(SystemExit) as e:
        ev.main(["--model", "tiny", flag, value])
    err = capsys.readouterr().err.splitlines()[-1]
    assert e.value.code == 2 and f"error: argument {flag}: " in err and value in err and allowed in err


def test_help_lists_the_choices(capsys):
    with pytest.raises(SystemExit):
        ev.main(["--help"])
    out = capsys.readouterr().out
    assert all(choices in out for choices in ("{auto,fp32,bf16}", "{rules,math-verify,both}", "{chat,plain}"))
    assert "--judge [MODEL]" in out and "opencompass/CompassVerifier-3B" in out


# ----------------------------------------------------------------------------------------------
# --grader math-verify / both


@pytest.mark.parametrize("grader", ["math-verify", "both"])
def test_grader_without_the_package_says_how_to_install_it(data_dir, tmp_path, monkeypatch, grader):
    monkeypatch.setitem(sys.modules, "math_verify", None)  # what `import math_verify` meets when it is not installed
    path = tmp_path / "generations.jsonl"
    path.write_bytes(jsonl(record("aime24", 0, 0)))
    with pytest.raises(SystemExit, match="pip install math-verify"):
        ev.main(["--score", str(path), "--grader", grader])
    with pytest.raises(SystemExit, match="pip install math-verify"):
        ev.main(eval_args(data_dir, tmp_path / "run", "--grader", grader))
    assert sorted(f.name for f in tmp_path.iterdir()) == ["bench", "generations.jsonl"]  # nothing written, no run


GRADED = [  # (benchmark, gold, completion): per benchmark, the graders agree on one sample and not the other
    ("aime24", "1", r"\boxed{1}"),
    ("aime24", "1", "The answer is $1$."),  # math-verify also reads answers outside \boxed{}
    ("math500", "2", r"\boxed{\sqrt{4}}"),  # math-verify evaluates; the rules compare forms
    ("math500", "2", r"\boxed{3}"),
    ("minerva", "4.5e33", r"\boxed{4.5 \times 10^{33}}"),  # math-verify reads the gold's e as Euler's number
    ("minerva", "4.5e33", r"\boxed{4.5e33}"),
]


def graded_file(tmp_path) -> Path:
    rows = [record(name, 0, j % 2, stapo.verify(text, gold), gold=gold, extracted=stapo.extract_boxed(text),
                   completion=text) for j, (name, gold, text) in enumerate(GRADED)]  # fmt: skip
    path = tmp_path / "generations.jsonl"
    path.write_bytes(jsonl(*rows))
    return path


def test_grader_both_adds_math_verify_and_agreement(tmp_path, capsys):
    pytest.importorskip("math_verify")
    ev.main(["--score", str(graded_file(tmp_path)), "--grader", "both"])
    results = json.loads((tmp_path / "generations.score-both.json").read_text())
    got = {name: [results[name][k] for k in ("avg@2", "math_verify_avg@2", "agreement", "math_verify_timeouts")]
           for name in ("aime24", "math500", "minerva")}  # fmt: skip
    assert got == {"aime24": [0.5, 1.0, 0.5, 0], "math500": [0.0, 0.5, 0.5, 0], "minerva": [1.0, 0.5, 0.5, 0]}
    table = capsys.readouterr().out
    assert "| benchmark | problems | avg@k | math-verify avg@k | agreement | pass@1 |" in table
    assert "| aime24 | 1 | 50.0 (k=2) | 100.0 | 50.0 | 50.0 |" in table

    ev.main(["--score", str(graded_file(tmp_path)), "--grader", "math-verify"])  # its verdicts are now the avg@k
    results = json.loads((tmp_path / "generations.score-math-verify.json").read_text())
    assert [results[name]["avg@2"] for name in ("aime24", "math500", "minerva")] == [1.0, 0.5, 0.5]


def test_math_verify_timeout_counts_as_wrong_and_is_reported(tmp_path, monkeypatch, capsys):
    pytest.importorskip("math_verify")
    monkeypatch.setattr(ev, "MATH_VERIFY_SECONDS", 1)
    path = tmp_path / "generations.jsonl"
    tower = r"\boxed{9^{9^{9^{9}}}}"  # sympy would try to compute this number and never finish
    path.write_bytes(jsonl(record("aime24", 0, 0, False, gold="5", extracted=tower[7:-1], completion=tower)))
    start = time.perf_counter()
    ev.main(["--score", str(path), "--grader", "both"])
    assert time.perf_counter() - start < 15  # 1 s of timeout, the rest is a loaded machine
    m = json.loads((tmp_path / "generations.score-both.json").read_text())["aime24"]
    assert (m["math_verify_avg@1"], m["math_verify_timeouts"]) == (0.0, 1)
    assert "| 1/0 |" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------
# The grader's budget: nested sets on both sides, and the real benchmark files


def nested_sets(height: int, leaf: str = "{}", swap: bool = False) -> str:
    r"""\{\{1,2\},\{2,3\}\}-like sets nested height levels deep (1,531 characters at height 8), shaped so that
    unordered matching meets many near-misses; swap writes every set's items in another order (same sets)."""
    x, y, z = (leaf.format(i) for i in (1, 2, 3))
    for _ in range(height):
        pairs = ((y, x), (z, y), (y, y)) if swap else ((x, y), (y, z), (y, y))
        x, y, z = (r"\{" + a + "," + b + r"\}" for a, b in pairs)
    return x


def sets_list(leaf: str = "{}", reverse: bool = False) -> str:
    r"""A bare list of 50 sets like \{7,\{7,8\}\}."""
    items = [r"\{i,\{i,j\}\}".replace("i", leaf.format(i)).replace("j", leaf.format(i + 1)) for i in range(50)]
    return ",".join(items[::-1] if reverse else items)


CHAIN = r"\{" * 499 + "1" + r"\}" * 499  # 1,997 characters


@pytest.mark.parametrize(
    ("pred", "gold", "expected"),
    [
        (nested_sets(8), nested_sets(8), True),  # prediction == gold
        (nested_sets(8, swap=True), nested_sets(8), True),  # the same sets, items in another order
        (nested_sets(7, "{}.0", swap=True), nested_sets(7), True),  # no two parts equal as strings
        (nested_sets(8, swap=True), nested_sets(8).replace("3", "4"), False),  # one kind of leaf differs
        (nested_sets(8, swap=True), nested_sets(8, "{}0"), False),  # every leaf differs
        (nested_sets(8), nested_sets(7) + "," + nested_sets(7), False),  # a set vs a list of two sets
        (CHAIN, CHAIN, True),  # 499 levels deep, equal
        (CHAIN, CHAIN.replace("1", "2"), False),  # 499 levels deep, innermost value differs
        (CHAIN.replace("1", "1.0"), CHAIN, None),  # too deep to compare within the budget: any answer, fast
        (r"\{1," * 330 + "1" + r"\}" * 330, r"\{1," * 330 + "2" + r"\}" * 330, None),  # deep and wide
        ("(" * 990 + "1" + ")" * 990, "(" * 990 + "2" + ")" * 990, False),  # deep parentheses
        (sets_list(), sets_list(reverse=True), True),  # 50 nested sets, the other way round
        (sets_list(), sets_list().replace("49", "51"), False),  # one set differs
        (sets_list("{}.0"), sets_list(reverse=True), True),  # 50 x 50 near-misses, no two parts equal as strings
        (sets_list(), CHAIN, False),  # 50 sets vs a chain
        # 50 numbers, decimals vs fractions in the opposite order: 1,275 comparisons, still within the budget
        (",".join(f"{i / 2}" for i in range(50, 0, -1)), ",".join(rf"\frac{{{i}}}{{2}}" for i in range(1, 51)), True),
    ],
)
def test_grade_is_fast_on_nested_sets_on_both_sides(pred, gold, expected):
    assert len(pred) <= stapo.MAX_ANSWER_CHARS and len(gold) <= stapo.MAX_ANSWER_CHARS
    for _ in range(2):  # cold, then with normalize_answer's cache warm
        start = time.process_time()
        result = ev.grade(f"\\boxed{{{pred}}}", gold)
        assert time.process_time() - start < 0.05
        assert result is expected if expected is not None else result in (True, False)
    ev.normalize_answer.cache_clear()


def test_grade_on_the_real_benchmarks():
    """Accuracy, false positives and speed on the benchmark files that ship in benchmarks/."""
    bench = ev.BENCHMARK_DIR
    raw = {name: [json.loads(line) for line in (bench / b.file).open()] for name, b in ev.BENCHMARKS.items()}
    ev.normalize_answer.cache_clear()
    calls, worst = 0, 0.0
    start = time.process_time()

    def timed(completion, gold):
        nonlocal calls, worst
        t = time.process_time()
        ok = ev.grade(completion, gold)
        worst = max(worst, time.process_time() - t)
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
    mean_ms = (time.process_time() - start) / calls * 1000
    print(f"verify: {calls} calls, mean {mean_ms:.3f} ms, worst {worst * 1000:.2f} ms")
    assert mean_ms < 0.2


# ----------------------------------------------------------------------------------------------
# --judge: CompassVerifier's prompt, its verdicts, and a tiny judge taught one letter


def test_the_judge_prompt_is_compassverifiers_published_one():
    question = (
        "Harold tosses a nickel four times.  What is the probability that he gets at least as many heads as tails?"
    )
    gold, response = r"\frac{11}{16}", r"so \boxed{0.6875}"  # the first sample of CompassVerifier's README, shorter
    content = ev.CV_PROMPT.format(question=question, gold_answer=gold, llm_response=response)
    published = "cf61fcd615fb04610722fce47e72d3d617dfdb2d44b987c55be1800439dce2ac"  # CV_PROMPT of CompassVerifier's
    assert hashlib.sha256(content.encode()).hexdigest() == published  # src/prompts.py filled in with these three
    assert content.startswith("\nPlease as a grading expert, judge whether the final answers given by the candidates")
    assert content.endswith(
        f"<Original Question Begin>:\n{question}\n<Original Question End>\n<Standard Answer "
        f"Begin>:\n{gold}\n<Standard Answer End>\n<Candidate's Answer Begin>: \n{response}\n"
        "<Candidate's Answer End>\nJudging the correctness of the candidate's answer:\n"
    )
    tokenizer = stapo.build_tiny_tokenizer()  # the user turn of the chat template, then the judge's turn
    prompt = ev.judge_prompt(tokenizer, question, gold, response)
    assert prompt == f"<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize(
    ("text", "verdict"),
    [("A", "correct"), ("B", "incorrect"), ("C", "invalid"), (" A\n", "correct"), (r"\boxed{B}", "incorrect"),
     ("C: INVALID", "invalid"), ("A.", "correct"), ("", "unparsed"), ("CORRECT", "unparsed"), ("D", "unparsed"),
     ("AAAA", "unparsed"), ("a", "unparsed"), ("The answer is A", "unparsed"), ("I think B", "unparsed")],
)  # fmt: skip
def test_verdicts_are_the_published_letters_and_anything_else_is_unparsed(text, verdict):
    assert ev.parse_verdict(text) == verdict


def teach_judge(folder: Path, letter: str) -> Path:
    """A tiny Qwen3 that answers every prompt with `letter`: attention silenced, so its next token depends on the
    last one alone, then a few supervised steps on the end of its chat turn (the tiny demo's teach_format, shorter)."""
    model, tokenizer = stapo.load_policy("tiny", torch.device("cpu"))
    for layer in model.model.layers:
        layer.self_attn.o_proj.weight.data.zero_()
        layer.self_attn.o_proj.weight.requires_grad_(False)
    ids = torch.tensor([tokenizer(f"assistant\n{letter}<|im_end|>", add_special_tokens=False).input_ids])
    labels = torch.where(torch.arange(ids.shape[1]) >= ids.shape[1] - 2, ids, -100)  # the letter and <|im_end|>
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    for _ in range(15):
        model(input_ids=ids, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.config.max_position_embeddings = 8192  # CompassVerifier's prompt alone is 2,700 bytes
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def judges(tmp_path_factory) -> dict:
    """Judge folders that answer "A" (correct) and "B" (incorrect) to anything."""
    folder = tmp_path_factory.mktemp("judges")
    return {letter: str(teach_judge(folder / letter, letter)) for letter in "AB"}


def judged_file(tmp_path, judged: dict | None = None) -> Path:
    """amc23 problems 0 and 1 of benchmarks/ (gold 27 and 36), 2 samples each: one right, one wrong each."""
    rows = [record("amc23", p, j, j == 0, gold=gold, extracted=None if j else gold,
                   completion=rf"so \boxed{{{gold}}}" if j == 0 else "so 5") for p, gold in enumerate(("27", "36"))
            for j in range(2)]  # fmt: skip
    for (p, j), fields in (judged or {}).items():  # (problem, sample): judge fields
        rows[2 * p + j] |= fields
    path = tmp_path / "generations.jsonl"
    path.write_bytes(jsonl(*rows))
    return path


@pytest.fixture
def judge_calls(monkeypatch):
    """The prompts of each generate call of the judge, which still runs."""
    calls, real = [], ev.judge_texts

    def recording(model, tokenizer, prompts):
        calls.append([tokenizer.decode(p) for p in prompts])
        return real(model, tokenizer, prompts)

    monkeypatch.setattr(ev, "judge_texts", recording)
    return calls


@pytest.mark.parametrize(("letter", "verdict", "judged"), [("A", "correct", 1.0), ("B", "incorrect", 0.5)])
def test_the_judge_sees_only_rule_negatives_and_an_a_flips_them(judges, judge_calls, tmp_path, capsys, letter,
                                                                 verdict, judged):  # fmt: skip
    path = judged_file(tmp_path)
    ev.main(["--score", str(path), "--judge", judges[letter], "--device", "cpu"])
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [{k: r[k] for k in ("judge", "judge_text", "judge_model") if k in r} for r in rows] == [
        {}, {"judge": verdict, "judge_text": letter, "judge_model": judges[letter]}] * 2  # fmt: skip
    assert len(judge_calls) == 1 and [p.count("<Candidate's Answer Begin>: \nso 5\n") for p in judge_calls[0]] == [1, 1]
    problem = ev.load_benchmark("amc23")[1]["problem"]  # the shorter prompt first: problem 1's, from benchmarks/
    assert f"Begin>:\n{problem}\n<Original" in judge_calls[0][0] and "Begin>:\n36\n<Standard" in judge_calls[0][0]
    results, flipped = json.loads((tmp_path / "generations.score-rules-judged.json").read_text()), 2 * (letter == "A")
    m = results["amc23"]
    assert (m["avg@2"], m["judged_avg@2"], m["judge_flipped"], results["judged_Avg"]) == (0.5, judged, flipped, judged)
    out = capsys.readouterr().out  # the judge's plan line (the machine's RAM), the table
    assert re.search(rf"^plan: {letter} weights 0.0 GB \(fp32\) .* of 2,9\d\d tokens per generate call", out, re.M)
    assert f"| amc23 | 2 | 50.0 (k=2) | {100 * judged:.1f} | {flipped} | 0/0 | 50.0 |" in out


def test_a_judged_file_is_written_after_each_call_and_a_rerun_asks_only_for_the_rest(judges, tmp_path, monkeypatch):
    path, real, asked = judged_file(tmp_path), ev.judge_texts, []

    def one_call_then_killed(model, tokenizer, prompts):
        if asked:
            raise KeyboardInterrupt
        asked.append(len(prompts))
        return real(model, tokenizer, prompts)

    monkeypatch.setattr(ev, "judge_texts", one_call_then_killed)
    argv = ["--score", str(path), "--judge", judges["A"], "--generate-batch", "1"]  # a call per sample
    with pytest.raises(KeyboardInterrupt):
        ev.main(argv)
    verdicts = lambda: [json.loads(line).get("judge") for line in path.read_text().splitlines()]  # noqa: E731
    assert verdicts() == [None, None, None, "correct"]  # the shortest prompt first: problem 1's
    monkeypatch.setattr(ev, "judge_texts", lambda model, tokenizer, prompts: asked.append(len(prompts)) or ["B"])
    ev.main(argv)
    assert asked == [1, 1] and verdicts() == [None, "incorrect", None, "correct"]  # only what was left
    ev.main(argv)  # all judged: the judge is not even loaded
    assert asked == [1, 1]


def test_the_judged_table_counts_flips_invalid_and_unparsed_verdicts(tmp_path, capsys):
    # amc23: problem 0 right once, wrong once (the judge: correct); problem 1 right once, wrong once (invalid)
    # aime24: 4 samples of one problem, one right by the rules; the judge: correct, unparsed ("CORRECT"), incorrect
    def verdict(v: str) -> dict:
        return {"judge": ev.parse_verdict(v), "judge_text": v, "judge_model": "some/judge"}

    path = judged_file(tmp_path, {(0, 1): verdict("A"), (1, 1): verdict("C")})
    rows = [json.loads(line) for line in path.read_text().splitlines()] + [record("aime24", 0, 0, True)]
    rows += [record("aime24", 0, j, False, **verdict(v)) for j, v in enumerate(("A", "CORRECT", "B"), 1)]
    path.write_bytes(jsonl(*rows))
    ev.main(["--score", str(path), "--judge", "some/judge"])  # every rule negative judged: no model, no Hub
    results = json.loads((tmp_path / "generations.score-rules-judged.json").read_text())
    got = {name: [m[k] for k in (f"judged_avg@{m['samples']}", "judge_flipped", "judge_invalid", "judge_unparsed")]
           for name, m in results.items() if name in ev.BENCHMARKS}  # fmt: skip
    assert got == {"aime24": [0.5, 1, 0, 1], "amc23": [0.75, 1, 1, 0]}
    assert (results["Avg"], results["judged_Avg"], results["judge"]) == (
        (0.25 + 0.5) / 2,
        (0.5 + 0.75) / 2,
        "some/judge",
    )
    out = capsys.readouterr().out
    assert "| benchmark | problems | avg@k | judged avg@k | judge flipped | judge invalid/unparsed | pass@1 |" in out
    assert (
        "| aime24 | 1 | 25.0 (k=4) | 50.0 | 1 | 0/1 | 25.0 |" in out
        and "| amc23 | 2 | 50.0 (k=2) | 75.0 | 1 | 1/0 |" in out
    )
    assert "judged Avg (the rules, then some/judge on their negatives): 62.5" in out


def test_a_judge_found_nowhere_is_one_line_naming_judge_and_a_local_folder(data_dir, tmp_path, offline):
    path = judged_file(tmp_path)
    message = (r"^--judge nobody/CompassVerifier-0B: no local file or folder of that name here, and HF_HUB_OFFLINE is "
               r"set; nor is it in the local cache; or --judge DIR, a local folder \(hf download "
               r"opencompass/CompassVerifier-3B --local-dir DIR\)$")  # fmt: skip
    with pytest.raises(SystemExit, match=message):
        ev.main(["--score", str(path), "--judge", "nobody/CompassVerifier-0B"])
    with pytest.raises(SystemExit, match=message):  # a run: before sampling, before a run folder
        ev.main(eval_args(data_dir, tmp_path / "run", "--judge", "nobody/CompassVerifier-0B"))
    assert sorted(f.name for f in tmp_path.iterdir()) == ["bench", "generations.jsonl"]


def test_a_judge_without_a_chat_template_is_named(tmp_path):
    tokenizer = stapo.build_tiny_tokenizer()
    tokenizer.chat_template = None
    tokenizer.save_pretrained(tmp_path / "judge")
    with pytest.raises(SystemExit, match=rf"^--judge {tmp_path / 'judge'}: its tokenizer has no chat template: the "
                       "judge is a chat model, like opencompass/CompassVerifier-3B$"):  # fmt: skip
        ev.main(["--score", str(judged_file(tmp_path)), "--judge", str(tmp_path / "judge")])


def test_the_judge_needs_the_problems_the_run_read(tmp_path):
    path = judged_file(tmp_path)
    path.write_text(path.read_text().replace('"gold": "36"', '"gold": "37"'))
    with pytest.raises(SystemExit, match=r"amc23 problem 1 with gold '37' is not in --data-dir .*: pass the one"):
        ev.main(["--score", str(path), "--judge", "some/judge"])


def test_an_eval_run_with_a_judge_frees_the_policy_first(data_dir, tmp_path, judges, judge_calls, monkeypatch):
    loaded, real = [], stapo.load_model

    def load_model(name, *args, **kwargs):
        if loaded:  # the judge: the policy is gone
            assert loaded[0]() is None
        model = real(name, *args, **kwargs)
        loaded.append(weakref.ref(model))
        return model

    monkeypatch.setattr(stapo, "load_model", load_model)
    ev.main(eval_args(data_dir, tmp_path / "run", "--benchmarks", "amc23", "--samples", "2", "--judge", judges["A"]))
    assert len(loaded) == 2 and [len(c) for c in judge_calls] == [2, 2]  # a random policy: 4 negatives, 3 per call
    assert json.loads((tmp_path / "run" / "settings.json").read_text())["judge"] == judges["A"]
    results = json.loads((tmp_path / "run" / "results.json").read_text())["amc23"]
    assert (results["avg@2"], results["judged_avg@2"], results["judge_flipped"]) == (0.0, 1.0, 4)
    assert "| judged avg@k |" in (tmp_path / "run" / "results.md").read_text()


def test_a_judge_that_does_not_fit_is_refused_before_it_loads(judges, tmp_path):
    path = judged_file(tmp_path)
    before = path.read_bytes()
    with pytest.raises(SystemExit, match=r"^plan: A weights .*\(DOES NOT FIT\): refused; try --precision bf16 or more "
                       r"memory$"):  # fmt: skip
        ev.main(["--score", str(path), "--judge", judges["A"], "--gpu-memory-gb", "0.0001"])
    assert path.read_bytes() == before
