"""Tests for eval.py on CPU with a tiny random Qwen3: `pytest -q test_eval.py`."""

import itertools
import json

import pytest

import eval as ev
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


@pytest.mark.parametrize(("n", "c"), [(1, 0), (1, 1), (4, 1), (4, 2), (5, 3), (6, 0), (6, 6)])
def test_pass_at_k_matches_enumeration(n, c):
    outcomes = [True] * c + [False] * (n - c)
    for k in range(1, n + 1):
        subsets = list(itertools.combinations(outcomes, k))
        assert ev.pass_at_k(n, c, k) == pytest.approx(sum(any(s) for s in subsets) / len(subsets))


def test_score_a_handwritten_generations_file(tmp_path, capsys):
    rows = []
    # aime24: problem 0 right in 1 of 4 samples, problem 1 in 2 of 4; math500: one problem, 2 samples, no box once
    for problem, correct in ((0, [1, 0, 0, 0]), (1, [1, 1, 0, 0])):
        rows += [{"benchmark": "aime24", "problem_idx": problem, "sample_idx": j, "correct": bool(c), "extracted": "1",
                  "length": 10, "truncated": False} for j, c in enumerate(correct)]  # fmt: skip
    rows += [{"benchmark": "math500", "problem_idx": 0, "sample_idx": 0, "correct": True, "extracted": "1", "length": 4,
              "truncated": False},
             {"benchmark": "math500", "problem_idx": 0, "sample_idx": 1, "correct": False, "extracted": None,
              "length": 8, "truncated": True}]  # fmt: skip
    path = tmp_path / "generations.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ev.main(["--score", str(path)])
    results = json.loads((tmp_path / "results.json").read_text())
    aime = results["aime24"]
    assert aime["avg@4"] == 3 / 8
    assert aime["pass@1"] == pytest.approx((1 / 4 + 2 / 4) / 2)
    assert aime["pass@2"] == pytest.approx(((1 - 3 / 6) + (1 - 1 / 6)) / 2)  # 1 - C(3,2)/C(4,2), 1 - C(2,2)/C(4,2)
    assert aime["pass@4"] == 1.0
    m = results["math500"]
    assert (m["avg@2"], m["pass@2"], m["no_box"], m["mean_length"], m["truncated"]) == (0.5, 1.0, 0.5, 6, 0.5)
    assert results["Avg"] == pytest.approx((3 / 8 + 1 / 2) / 2)
    assert "| aime24 | 2 | 37.5 (k=4) | 37.5 | 66.7 | 100.0 |" in capsys.readouterr().out


def eval_args(data_dir, out, *extra):
    return ["--model", "tiny", "--data-dir", str(data_dir), "--samples", "3", "--max-new-tokens", "12",
            "--batch-size", "4", "--output-dir", str(out), *extra]  # fmt: skip


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


def test_eval_refuses_to_mix_settings(data_dir, tmp_path):
    ev.main(eval_args(data_dir, tmp_path, "--benchmarks", "amc23"))
    with pytest.raises(SystemExit, match="temperature"):
        ev.main(eval_args(data_dir, tmp_path, "--benchmarks", "amc23", "--preset", "t0.7"))
