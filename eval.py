"""Score a model on the six math benchmarks of the STAPO paper (arXiv 2602.15620v4, Sec. 5).

AIME24, AIME25, AMC23 with 32 samples per problem, MATH500, Minerva, OlympiadBench with 4, read from the
copies in benchmarks/ (--data-dir hub: the Hub ids). Prompt and generation are those of stapo.py. The
grade is the paper's rule-based check: `grade`, stapo.verify (the training reward) and, past it, structured
matching (tuples, intervals, sets, unordered lists, equations, units); `--grader math-verify` re-scores the
same samples with HF's math-verify (optional package), `--grader both` adds its avg@k and the share of samples
the two agree on. `--judge` then shows every sample the rules graded wrong to an LLM verifier (the paper's
CompassVerifier-3B by default) with CompassVerifier's prompt; a verdict "correct" makes it right, and the
verdicts are saved in the generations file. Reported per benchmark: avg@k (mean accuracy over the k samples,
the paper's number; with --judge also judged), unbiased pass@k for k = 1, 2, 4, ..., the share of answers
without \\boxed{}, mean length, truncation rate; and "Avg", the unweighted mean of the benchmarks' avg@k.

A benchmark's samples form one queue, sorted by prompt length and cut into as few generate calls as the
memory plan allows (plan.eval_plan): bf16 weights on a GPU and per sequence its KV cache and sampler memory;
`--dry-run` prints the plan line from the model's config. Every sample is appended to
<output-dir>/generations.jsonl when its call is done; rerunning the same command skips finished calls (each
call has its own seed, so the final table is the same as without the interruption). A rerun with any other
setting, the plan's sequences per call included, is refused (settings.json). `--score FILE` rebuilds the
table from a generations file without a model (but the judge's), into <FILE stem>.score-<grader>.md/.json
beside FILE.

    python eval.py --model runs/stapo/step-000200                # all six
    python eval.py --model tiny --limit 5                        # a random model: a smoke test, offline
    python eval.py --model Qwen/Qwen3-14B --dry-run              # does it fit one GPU?
    python eval.py --score evals/stapo-step-000200_t1.0_p1.0/generations.jsonl --grader both
    python eval.py --score evals/stapo-step-000200_t1.0_p1.0/generations.jsonl --judge   # + CompassVerifier-3B
"""

import argparse
import functools
import gc
import inspect
import json
import math
import re
import sys
import time
import zlib
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

import plan
import stapo


@dataclass(frozen=True)
class Benchmark:
    hub_id: str
    split: str
    file: str  # name in --data-dir
    samples: int  # samples per problem in the paper


BENCHMARKS = {
    "aime24": Benchmark("HuggingFaceH4/aime_2024", "train", "aime24.jsonl", 32),
    "aime25": Benchmark("math-ai/aime25", "test", "aime25.jsonl", 32),
    "amc23": Benchmark("math-ai/amc23", "test", "amc23.jsonl", 32),
    "math500": Benchmark("HuggingFaceH4/MATH-500", "test", "math500.jsonl", 4),
    "minerva": Benchmark("math-ai/minervamath", "test", "minerva_math.jsonl", 4),
    "olympiadbench": Benchmark("math-ai/olympiadbench", "test", "olympiadbench.jsonl", 4),
}
BENCHMARK_DIR = Path(__file__).parent / "benchmarks"  # the six files, shipped with the project (its README.md)
PRESETS = {"t1.0": (1.0, 1.0), "t0.7": (0.7, 0.9)}  # (temperature, top-p): the paper's two settings
GRADERS = ("rules", "math-verify", "both")  # rules: grade
MATH_VERIFY_SECONDS = 5  # per math-verify parse or compare call (its own default); a timeout counts as wrong
RECORD_FIELDS = {"benchmark": str, "problem_idx": int, "sample_idx": int, "gold": str, "extracted": (str, type(None)),
                 "correct": bool, "length": int, "truncated": bool, "completion": str}  # fmt: skip


# ----------------------------------------------------------------------------------------------
# The rule-based grader: the training reward, then structured matching for what benchmarks answer

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
        s = stapo.extract_boxed(s) or ""
    if not s or len(s) > stapo.MAX_ANSWER_CHARS or not _balanced(s):
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
    if stapo.THOUSANDS.fullmatch(s.strip()):  # 1,234,567; checked while spaces still tell "32, 349" (a list) apart
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


def rule_grade(completion: str, gold: str) -> bool:
    """True if the last \\boxed{} of the completion equals the gold answer under the structured rules. Never raises."""
    try:
        boxed = stapo.extract_boxed(completion)
        pred = normalize_answer(boxed) if boxed else None
        target = normalize_answer(str(gold))
        return pred is not None and target is not None and answers_match(pred, target)
    except (ValueError, OverflowError, RecursionError):  # a bug must not crash a long run
        return False


def grade(completion: str, gold: str) -> bool:
    """A benchmark sample is right if the training reward (stapo.verify) or the structured rules accept it."""
    return stapo.verify(completion, gold) or rule_grade(completion, gold)


# ----------------------------------------------------------------------------------------------
# Data


def benchmark_example(name: str, row: dict) -> dict | None:
    """A benchmark row -> {"problem", "answer"}, each file's layout and quirks undone; None without an answer.
    The problem is "problem" or "question"; the gold is "answer" (AMC23: a float such as 27.0), OlympiadBench's
    "final_answer" (a list of one, in $...$), or the last \\boxed{} of Minerva's "solution"."""
    problem = row.get("problem") or row.get("question")
    answer = row.get("answer", row.get("final_answer"))
    answer = answer[0] if isinstance(answer, list) and len(answer) == 1 else answer
    if answer is None and isinstance(row.get("solution"), str):
        answer = stapo.extract_boxed(row["solution"])
    answer = int(answer) if isinstance(answer, float) and answer.is_integer() else answer
    if not isinstance(problem, str) or not problem.strip() or not isinstance(answer, str | int | float):
        return None
    if name == "aime25":  # "\frac" and "\triangle" lost their backslash to JSON escapes: \f, \t
        problem = problem.replace("\x0c", "\\f").replace("\t", "\\t")
    answer = str(answer).strip().strip("$").strip()  # OlympiadBench: $...$
    return {"problem": problem.strip(), "answer": answer} if answer else None


def load_benchmark(name: str, data_dir: str | Path = BENCHMARK_DIR) -> list[dict]:
    """A benchmark's problems, from its jsonl file in data_dir or, with data_dir "hub", from the Hub."""
    bench = BENCHMARKS[name]
    if str(data_dir) == "hub":
        import datasets

        with stapo.loading(f"{name}: --data-dir hub:", bench.hub_id, "dataset"):
            source, rows = bench.hub_id, list(datasets.load_dataset(bench.hub_id, split=bench.split))
    else:
        source = Path(data_dir) / bench.file
        if not source.is_file():
            files = ", ".join(b.file for b in BENCHMARKS.values())
            raise SystemExit(f"{source} not found: --data-dir must hold {files} (or be hub)")
        rows = stapo.read_jsonl(source, torn_tail_ok=False)
    examples = [benchmark_example(name, row) for row in rows]
    if None in examples or not examples:
        n = examples.index(None) if None in examples else -1
        raise SystemExit(f"{source}: no problems" if n < 0 else f"{source}: row {n + 1}: no problem text or no usable "
                         f"answer (fields: {', '.join(sorted(rows[n]))})")  # fmt: skip
    return examples


def write_generations(path: Path, records: list[dict]):
    """The file replaced whole or not at all (stapo.replace_file), each record on its line as append_jsonl writes it."""
    stapo.replace_file(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def read_generations(path: Path) -> list[dict]:
    """The records of a generations file; SystemExit if it is not one (a torn last line is dropped)."""
    if not path.is_file():
        raise SystemExit(f"{path}: not a file")
    records, seen = stapo.read_jsonl(path), {}
    for n, r in enumerate(records, 1):
        bad = [k for k, kind in RECORD_FIELDS.items() if not isinstance(r.get(k, ...), kind)]
        if bad:
            raise SystemExit(f"{path}: line {n}: not a generation record of eval.py (missing or mistyped: {bad})")
        if r["benchmark"] not in BENCHMARKS:
            raise SystemExit(f"{path}: line {n}: unknown benchmark {r['benchmark']!r}; known: {', '.join(BENCHMARKS)}")
        key = (r["benchmark"], r["problem_idx"], r["sample_idx"])
        if key in seen:  # counting it twice would weigh one problem more than the others
            raise SystemExit(f"{path}: line {n} repeats {key} of line {seen[key]}")
        seen[key] = n
    return records


# ----------------------------------------------------------------------------------------------
# Metrics


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k = 1 - C(n-c, k) / C(n, k), with n samples of which c are correct."""
    if n - c < k:
        return 1.0
    return 1.0 - math.prod((n - c - i) / (n - i) for i in range(k))


def score_rows(rows: list[dict], grader: str = "rules", judge: str | None = None) -> dict:
    """Per-benchmark metrics from generation records; with math-verify, its verdict is each r["math_verify"]; with
    a judge, its verdict on each rule negative is r["judge"] and "judged" is right by the rules or by the judge."""
    results = {}
    for name in [b for b in BENCHMARKS if any(r["benchmark"] == b for r in rows)]:
        mine = [r for r in rows if r["benchmark"] == name]
        correct = [r["math_verify"] is True if grader == "math-verify" else r["correct"] for r in mine]
        per_problem = defaultdict(list)
        for r, c in zip(mine, correct, strict=True):
            per_problem[r["problem_idx"]].append(c)
        n = min(len(v) for v in per_problem.values())
        ks = [2**i for i in range(int(math.log2(n)) + 1)]
        m = results[name] = {
            "problems": len(per_problem),
            "samples": n,
            f"avg@{n}": sum(correct) / len(mine),
            **{
                f"pass@{k}": sum(pass_at_k(len(v), sum(v), k) for v in per_problem.values()) / len(per_problem)
                for k in ks
            },
            "no_box": sum(r["extracted"] is None for r in mine) / len(mine),
            "mean_length": sum(r["length"] for r in mine) / len(mine),
            "truncated": sum(r["truncated"] for r in mine) / len(mine),
        }
        if grader == "both":
            verdicts = [r["math_verify"] is True for r in mine]
            m[f"math_verify_avg@{n}"] = sum(verdicts) / len(mine)
            m["agreement"] = sum(a == b for a, b in zip(correct, verdicts, strict=True)) / len(mine)
        if grader != "rules":
            m["math_verify_timeouts"] = sum(r["math_verify"] == "timeout" for r in mine)
            m["math_verify_errors"] = sum(r["math_verify"] == "error" for r in mine)
        if judge:  # the judge saw only the rule negatives: each "correct" is a flip
            verdicts = [r.get("judge") for r in mine]
            m |= {f"judged_avg@{n}": sum(r["correct"] or r.get("judge") == "correct" for r in mine) / len(mine),
                  "judge_flipped": verdicts.count("correct"), "judge_invalid": verdicts.count("invalid"),
                  "judge_unparsed": verdicts.count("unparsed")}  # fmt: skip
    benchmarks = list(results.values())

    def mean(key: str) -> float:  # unweighted, over the benchmarks
        return sum(m[f"{key}@{m['samples']}"] for m in benchmarks) / max(1, len(benchmarks))

    results["Avg"] = mean("avg")
    if judge:
        results["judged_Avg"] = mean("judged_avg")
    return results | {"grader": grader, "judge": judge}


def markdown_table(results: dict) -> str:
    benchmarks = {name: m for name, m in results.items() if isinstance(m, dict)}
    grader = results.get("grader", "rules")
    ks = sorted({int(k[5:]) for m in benchmarks.values() for k in m if k.startswith("pass@")})
    both = ["math-verify avg@k", "agreement"] if grader == "both" else []
    timeouts = ["math-verify timeouts/errors"] if grader != "rules" else []
    judged = ["judged avg@k", "judge flipped", "judge invalid/unparsed"] if results.get("judge") else []
    head = ["benchmark", "problems", "avg@k", *judged, *both, *[f"pass@{k}" for k in ks], "no box", "mean len",
            "truncated", *timeouts]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, m in benchmarks.items():
        k = m["samples"]
        row = [name, str(m["problems"]), f"{100 * m[f'avg@{k}']:.1f} (k={k})"]
        if judged:
            row += [f"{100 * m[f'judged_avg@{k}']:.1f}", str(m["judge_flipped"]),
                    f"{m['judge_invalid']}/{m['judge_unparsed']}"]  # fmt: skip
        if both:
            row += [f"{100 * m[f'math_verify_avg@{k}']:.1f}", f"{100 * m['agreement']:.1f}"]
        row += [f"{100 * m[f'pass@{k}']:.1f}" if f"pass@{k}" in m else "" for k in ks]
        row += [f"{100 * m['no_box']:.1f}", f"{m['mean_length']:.0f}", f"{100 * m['truncated']:.1f}"]
        if timeouts:
            row.append(f"{m['math_verify_timeouts']}/{m['math_verify_errors']}")
        lines.append("| " + " | ".join(row) + " |")
    graded, avg = "rules" if grader == "both" else grader, 100 * results["Avg"]
    lines.append(f"\nAvg (unweighted mean of avg@k over {len(benchmarks)} benchmarks, graded by {graded}): {avg:.1f}")
    if judged:
        judged_avg = 100 * results["judged_Avg"]
        lines.append(f"judged Avg (the rules, then {results['judge']} on their negatives): {judged_avg:.1f}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# math-verify (optional): a second opinion on the same samples


def load_math_verify():
    try:
        import math_verify
    except ImportError:
        raise SystemExit("--grader math-verify/both needs the math-verify package: pip install math-verify") from None
    if "raise_on_error" not in inspect.signature(math_verify.parse).parameters:  # 0.8 tells a timeout from a miss
        raise SystemExit("--grader math-verify needs math-verify >= 0.8: pip install -U math-verify")
    return math_verify


def math_verify_verdicts(rows: list[dict]) -> list[bool | str]:
    """math-verify's verdict on each record's completion against its gold: True, False, "timeout" or "error".
    Each parse and compare call gets MATH_VERIFY_SECONDS, enforced by math-verify with SIGALRM (main thread
    only, where this runs), which also stops a runaway sympy evaluation such as 9^{9^{9^9}}."""
    mv = load_math_verify()
    from math_verify.errors import TimeoutException

    print(f"math-verify: grading {len(rows)} samples", flush=True)

    def parse(text: str) -> list:
        return mv.parse(text, parsing_timeout=MATH_VERIFY_SECONDS, raise_on_error=True)

    golds, verdicts = {}, []
    for r in tqdm(rows, desc="math-verify", disable=None):
        try:
            if r["gold"] not in golds:
                golds[r["gold"]] = parse(f"\\boxed{{{r['gold']}}}")  # boxed, as the model is asked to answer
            pred = parse(r["completion"])
            verdicts.append(mv.verify(golds[r["gold"]], pred, timeout_seconds=MATH_VERIFY_SECONDS, raise_on_error=True))
        except TimeoutException:  # a BaseException
            verdicts.append("timeout")
        except Exception:  # LaTeX it cannot take: a miss, as math-verify's own default has it, but counted
            verdicts.append("error")
    return verdicts


def write_results(rows: list[dict], json_path: Path, md_path: Path, grader: str, judge: str | None = None) -> str:
    if grader != "rules":
        for r, verdict in zip(rows, math_verify_verdicts(rows), strict=True):
            r["math_verify"] = verdict
    results = score_rows(rows, grader, judge)
    table = markdown_table(results)
    json_path.write_text(json.dumps(results, indent=2))
    md_path.write_text(table + "\n")
    return f"{table}\nwrote {md_path} and {json_path}"


# ----------------------------------------------------------------------------------------------
# The LLM judge (--judge): the paper's CompassVerifier-3B, shown what the rules graded wrong

JUDGE = "opencompass/CompassVerifier-3B"
JUDGE_TOKENS = 8  # greedy; CompassVerifier answers with one letter
VERDICTS = {"A": "correct", "B": "incorrect", "C": "invalid"}  # else "unparsed", which counts as incorrect
# CompassVerifier's prompt, verbatim: CV_PROMPT of src/prompts.py in github.com/open-compass/CompassVerifier
# (commit c5d6700, unchanged up to 2d7cba6), the user turn of the judge's chat template as its README uses it.
# Three of its lines end in a space; test_eval.py checks it against the published text.
CV_PROMPT = """
Please as a grading expert, judge whether the final answers given by the candidates below are consistent with the standard answers, that is, whether the candidates answered correctly. 
Here are some evaluation criteria:
1. Please refer to the given standard answer. You don't need to re-generate the answer to the question because the standard answer has been given. You only need to judge whether the candidate's answer is consistent with the standard answer according to the form of the question. THE STANDARD ANSWER IS ALWAYS CORRECT AND THE QUESTION IS PERFECTLY VALID. NEVER QUESTION THEM.
2. ONLY compare the FINAL ANSWER - COMPLETELY IGNORE any potential errors in the REASONING PROCESSES.
3. Some answers may be expressed in different ways, such as some answers may be a mathematical expression, some answers may be a textual description, as long as the meaning expressed is the same. Before making a judgment, please understand the question and the standard answer first, and then judge whether the candidate's answer is correct.
4. Some answers may consist of multiple items, such as multiple-choice questions, multiple-select questions, fill-in-the-blank questions, etc. Regardless of the question type, the final answer will be considered correct as long as it matches the standard answer, regardless of whether the reasoning process is correct. For multiple-select questions and multi-blank fill-in-the-blank questions, all corresponding options or blanks must be answered correctly and match the standard answer exactly to be deemed correct.
5. If the prediction is given with \\boxed{{}}, please ignore the \\boxed{{}} and only judge whether the candidate's answer is consistent with the standard answer.
6. If the candidate's answer is invalid (e.g., incomplete (cut off mid-response), lots of unnormal repetitive content, or irrelevant to the question, saying it can't answer the question because some irresistible factors, like ethical issues, no enough information, etc.), select option C (INVALID).Please judge whether the following answers are consistent with the standard answer based on the above criteria. Grade the predicted answer of this new question as one of:
A: CORRECT 
B: INCORRECT
C: INVALID
Just return the letters "A", "B", or "C", with no text around it.
Here is your task. Simply reply with either CORRECT, INCORRECT, or INVALID. Don't apologize or correct yourself if there was a mistake; we are just trying to grade the answer.
<Original Question Begin>:
{question}
<Original Question End>
<Standard Answer Begin>:
{gold_answer}
<Standard Answer End>
<Candidate's Answer Begin>: 
{llm_response}
<Candidate's Answer End>
Judging the correctness of the candidate's answer:
"""  # noqa: E501, W291


def judge_prompt(tokenizer, question: str, gold: str, response: str) -> str:
    content = CV_PROMPT.format(question=question, gold_answer=gold, llm_response=response)
    return tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                         add_generation_prompt=True)  # fmt: skip


def parse_verdict(text: str) -> str:
    """The judge's letter, A, B or C (alone, or first, or in \\boxed{}), as a verdict in VERDICTS; else "unparsed"."""
    m = re.match(r"\s*(?:\\boxed\{)?([ABC])(?![A-Za-z])", text)
    return VERDICTS[m[1]] if m else "unparsed"


@contextmanager
def judge_loading(name: str):
    """stapo.loading for --judge; a name found nowhere also says how to pass a local folder."""
    try:
        with stapo.loading("--judge", name):
            yield
    except SystemExit as e:
        hint = "" if Path(name).exists() else f"; or --judge DIR, a local folder (hf download {JUDGE} --local-dir DIR)"
        raise SystemExit(f"{e.code}{hint}") from None


def load_judge_tokenizer(name: str):
    with judge_loading(name):
        tokenizer = stapo.load_tokenizer(name)
    if not tokenizer.chat_template:
        raise SystemExit(f"--judge {name}: its tokenizer has no chat template: the judge is a chat model, like {JUDGE}")
    return tokenizer


@torch.no_grad()
def judge_texts(model, tokenizer, prompts: list[torch.Tensor]) -> list[str]:
    """The judge's answers to the prompts, in one generate call: greedy, and otherwise the judge's own generation
    config, as CompassVerifier's README runs it."""
    ids, mask = stapo.left_pad(prompts, tokenizer.pad_token_id)
    device = next(model.parameters()).device
    out = model.eval().generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                                max_new_tokens=JUDGE_TOKENS, pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    return tokenizer.batch_decode(out[:, ids.shape[1] :], skip_special_tokens=True)


def judge_samples(records: list[dict], path: Path, args, device: torch.device):
    """Every record the rules graded wrong and --judge has not judged yet goes to the judge, with its problem from
    --data-dir, in one queue sorted by prompt length and cut into as few generate calls as the plan allows. Each
    verdict is written into its record ("judge", "judge_text", "judge_model") and the file replaced after each call,
    so a rerun asks only for the rest. What the rules graded right is never shown to the judge."""
    todo = [r for r in records if not r["correct"] and r.get("judge_model") != args.judge]
    if not todo:
        return
    problems = {name: load_benchmark(name, args.data_dir) for name in {r["benchmark"] for r in todo}}
    for r in todo:
        examples = problems[r["benchmark"]]
        if r["problem_idx"] >= len(examples) or examples[r["problem_idx"]]["answer"] != r["gold"]:
            raise SystemExit(f"{path}: {r['benchmark']} problem {r['problem_idx']} with gold {r['gold']!r} is not in "
                             f"--data-dir {args.data_dir}: pass the one the run read")  # fmt: skip
    tokenizer = load_judge_tokenizer(args.judge)
    prompts = [judge_prompt(tokenizer, problems[r["benchmark"]][r["problem_idx"]]["problem"], r["gold"],
                            r["completion"]) for r in todo]  # fmt: skip
    prompts = [torch.tensor(tokenizer(p, add_special_tokens=False).input_ids) for p in prompts]
    queue = sorted(range(len(todo)), key=lambda i: len(prompts[i]))
    sizing = fitting_plan(args, device, max(map(len, prompts)), len(prompts), judge=True)
    with judge_loading(args.judge):
        model = stapo.load_model(args.judge, device, tokenizer, dtype=(torch.float32, torch.bfloat16)[sizing["bf16"]])
    calls = math.ceil(len(queue) / sizing["sequences_per_call"])
    print(f"judge: {len(todo)} samples the rules graded wrong, in {calls} generate call(s)", flush=True)
    for c in tqdm(range(calls), desc="judge", disable=None):
        call = queue[c * len(queue) // calls : (c + 1) * len(queue) // calls]
        for i, text in zip(call, judge_texts(model, tokenizer, [prompts[i] for i in call]), strict=True):
            todo[i] |= {"judge": parse_verdict(text), "judge_text": text, "judge_model": args.judge}
        write_generations(path, records)


# ----------------------------------------------------------------------------------------------
# Generation


def eval_plan(args, device: torch.device | None, prompt_tokens: int, judge: bool = False, sequences: int = 0) -> dict:
    """plan.eval_plan for the generate calls of --model or, judge True, of --judge (JUDGE_TOKENS new tokens) on
    device (None: a GPU of --gpu-memory-gb or 80 GB, as --dry-run plans for), for `sequences` (0: any number)."""
    with judge_loading(args.judge) if judge else stapo.loading("--model", args.model):
        c = stapo.load_model_config(args.judge if judge else args.model)
    bf16 = args.precision == "bf16" or (args.precision == "auto" and (device is None or device.type == "cuda"))
    device_bytes = stapo.device_memory(stapo.Config(gpu_memory_gb=args.gpu_memory_gb or (0 if device else 80)), device)
    new_tokens = JUDGE_TOKENS if judge else args.max_new_tokens
    return plan.eval_plan(c, device_bytes, bf16, prompt_tokens, new_tokens, args.generate_batch, sequences)


def fitting_plan(args, device: torch.device, prompt_tokens: int, sequences: int, judge: bool = False) -> dict:
    """eval_plan, its line printed; SystemExit with that line and what to try if it does not fit."""
    sizing = eval_plan(args, device, prompt_tokens, judge, sequences)
    line = plan.eval_plan_line(sizing, Path(args.judge if judge else args.model).name)
    print(line, flush=True)
    if sizing["total"] > sizing["budget"]:
        fixes = ["--generate-batch 0"] * (args.generate_batch > 0) + ["--precision bf16"] * (not sizing["bf16"])
        fixes += ["a shorter --max-new-tokens"] * (not judge) + ["more memory"]  # the judge writes 8 tokens
        raise SystemExit(f"{line}: refused; try {' or '.join(fixes)}")
    return sizing


def call_seed(seed: int, name: str, call: int) -> int:
    return zlib.crc32(f"{seed}/{name}/{call}".encode())


def refuse_other_settings(out_dir: Path, settings: dict):
    """SystemExit if out_dir holds a run made with other values of these settings."""
    saved = json.loads((out_dir / "settings.json").read_text()) if (out_dir / "settings.json").exists() else settings
    changed = "; ".join(f"{k} {saved.get(k)!r} -> {v!r}" for k, v in settings.items() if saved.get(k) != v)
    if changed:
        raise SystemExit(f"{out_dir} holds a run with other settings ({changed}): pick another --output-dir")


def open_run(out_dir: Path, settings: dict) -> tuple[Path, dict]:
    """The generations file of out_dir and {(benchmark, problem, sample): correct} of what it already holds."""
    refuse_other_settings(out_dir, settings)
    out_dir.mkdir(parents=True, exist_ok=True)
    settings_path, gen_path = out_dir / "settings.json", out_dir / "generations.jsonl"
    settings_path.write_text(json.dumps(settings, indent=2))
    if not gen_path.exists():
        return gen_path, {}
    done, data = read_generations(gen_path), gen_path.read_bytes()
    if data and not data.endswith(b"\n"):  # a kill during an append: a torn last line goes (read_generations
        write_generations(gen_path, done)  # warned), a whole one gets its newline
    return gen_path, {(r["benchmark"], r["problem_idx"], r["sample_idx"]): r["correct"] for r in done}


def sample_benchmark(model, tokenizer, name: str, examples: list[dict], prompts: list, k: int, cfg, seed: int,
                     gen_path: Path, have: dict):  # fmt: skip
    """k samples of every problem: one queue of (problem, sample) items sorted by prompt length (less padding),
    cut into as few generate calls as the plan allows, evenly filled, each seeded by its index; calls whose
    samples are all in `have` are skipped, the others' new samples added."""
    items = sorted(((i, j) for i in range(len(examples)) for j in range(k)), key=lambda item: len(prompts[item[0]]))
    calls = math.ceil(len(items) / cfg.generate_batch)
    bar = tqdm(total=len(items), desc=f"{name} samples", disable=None)
    for c in range(calls):
        call = items[c * len(items) // calls : (c + 1) * len(items) // calls]
        if all((name, i, j) in have for i, j in call):
            bar.update(len(call))
            continue
        torch.manual_seed(call_seed(seed, name, c))  # a call's samples do not depend on what ran before
        rollouts = stapo.generate(model, tokenizer, [prompts[i] for i, _ in call], cfg, f"generate {c + 1}/{calls}")
        records = []
        for row, (i, j) in enumerate(call):
            if (name, i, j) in have:
                continue
            ids = rollouts.completions[row, rollouts.completion_mask[row]]
            text, gold = tokenizer.decode(ids, skip_special_tokens=True), examples[i]["answer"]
            records.append({"benchmark": name, "problem_idx": i, "sample_idx": j, "gold": gold,
                            "extracted": stapo.extract_boxed(text), "correct": grade(text, gold),
                            "length": len(ids), "truncated": bool(rollouts.truncated[row]),
                            "completion": text})  # fmt: skip
        stapo.append_jsonl(gen_path, records)
        have |= {(name, r["problem_idx"], r["sample_idx"]): r["correct"] for r in records}
        bar.update(len(call))
    bar.close()
    return {(name, i, j) for i, j in items}


def evaluate(args) -> str:
    preset_temperature, preset_top_p = PRESETS[args.preset]
    temperature, top_p = args.temperature or preset_temperature, args.top_p or preset_top_p  # both > 0 if given
    names = args.benchmarks.split(",") if args.benchmarks else list(BENCHMARKS)
    for name in names:
        if name not in BENCHMARKS:
            raise SystemExit(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}")
    if args.grader != "rules":
        load_math_verify()  # missing: say so now, not after hours of sampling
    if args.judge:
        load_judge_tokenizer(args.judge)  # likewise: not on the Hub, no chat template
    device = stapo.resolve_device(stapo.Config(device=args.device))
    # Everything that changes a sample or a score: the device type because precision "auto" and the kernels
    # depend on it, and (below) the plan's sequences per call because it cuts the queue into generate calls.
    data = "hub" if args.data_dir == "hub" else str(Path(args.data_dir).resolve())
    settings = {"model": args.model, "temperature": temperature, "top_p": top_p, "max_new_tokens": args.max_new_tokens,
                "seed": args.seed, "prompt_format": args.prompt_format, "samples": args.samples, "limit": args.limit,
                "data": data, "precision": args.precision, "device": device.type, "grader": args.grader,
                "judge": args.judge}  # fmt: skip
    name = "-".join(Path(args.model).parts[-2:]) if Path(args.model).name.startswith("step-") else Path(args.model).name
    out_dir = Path(args.output_dir or f"evals/{name}_t{temperature}_p{top_p}")  # runs/stapo/step-N: stapo-step-N
    refuse_other_settings(out_dir, settings)  # now, before the tokenizer and the plan are loaded
    benchmarks = {name: load_benchmark(name, args.data_dir)[: args.limit] for name in names}  # bad files fail here
    with stapo.loading("--model", args.model):
        tokenizer = stapo.load_tokenizer(args.model)
    prompts = {name: [stapo.encode_prompt(e["problem"], tokenizer, args.prompt_format) for e in examples]
               for name, examples in benchmarks.items()}  # fmt: skip
    sequences = max(len(ps) * (args.samples or BENCHMARKS[name].samples) for name, ps in prompts.items())
    sizing = fitting_plan(args, device, max(len(p) for ps in prompts.values() for p in ps), sequences)  # before a run
    gen_path, have = open_run(out_dir, settings | {"sequences_per_call": sizing["sequences_per_call"]})
    print(f"eval: writing to {out_dir.resolve()}", flush=True)  # flushed: a batch job's log shows it at once

    with stapo.loading("--model", args.model):
        model = stapo.load_model(
            args.model, device, tokenizer, dtype=torch.bfloat16 if sizing["bf16"] else torch.float32
        )
    cfg = stapo.Config(temperature=temperature, top_p=top_p, max_new_tokens=args.max_new_tokens,
                       generate_batch=sizing["sequences_per_call"],
                       precision="bf16-autocast" if sizing["bf16"] else "fp32")  # fmt: skip
    wanted = set()
    for name, examples in benchmarks.items():
        k, start = args.samples or BENCHMARKS[name].samples, time.perf_counter()  # samples None: the paper's number
        keys = sample_benchmark(model, tokenizer, name, examples, prompts[name], k, cfg, args.seed, gen_path, have)
        wanted |= keys
        avg = sum(have[key] for key in keys) / len(keys)
        print(f"{name} | {len(examples)} problems x {k} samples | avg@{k} {100 * avg:.1f} (rules) | "
              f"{time.perf_counter() - start:.0f}s", flush=True)  # fmt: skip
    records = read_generations(gen_path)
    if args.judge:
        del model  # the judge loads once the policy's memory is free
        gc.collect()
        judge_samples(records, gen_path, args, device)
    rows = [r for r in records if (r["benchmark"], r["problem_idx"], r["sample_idx"]) in wanted]
    return write_results(rows, out_dir / "results.json", out_dir / "results.md", args.grader, args.judge)


def number(kind, allowed: str, ok):
    """An argparse type that refuses, by value and rule, what argparse would let through (-29, 0, nan, 1.5)."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not ok(value):
            raise argparse.ArgumentTypeError(f"{text} is not allowed: give {allowed}")
        return value

    return parse


COUNT = number(int, "a whole number >= 1", lambda v: v >= 1)
POSITIVE = number(float, "a number > 0", lambda v: 0 < v < math.inf)
NON_NEGATIVE_INT = number(int, "a whole number >= 0", lambda v: v >= 0)
PROBABILITY = number(float, "a number in (0, 1]", lambda v: 0 < v <= 1)
DEVICE = number(str, "auto, cpu, cuda or cuda:N", lambda v: re.fullmatch(r"auto|cpu|cuda(:\d+)?", v))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", help="HF id, checkpoint folder, or 'tiny' (random CPU model)")
    p.add_argument("--score", metavar="FILE", help="score a generations file into <stem>.score-<grader>.md beside it")
    p.add_argument("--benchmarks", help=f"comma-separated subset of {','.join(BENCHMARKS)} (default: all)")
    p.add_argument("--data-dir", default=BENCHMARK_DIR, help="folder of the six jsonl files (default: benchmarks/ "
                   "beside eval.py); hub: the Hub ids")  # fmt: skip
    p.add_argument("--preset", choices=PRESETS, default="t1.0", help="t1.0: temperature 1.0, top-p 1.0; t0.7: 0.7/0.9")
    p.add_argument("--temperature", type=POSITIVE, help="overrides the preset")
    p.add_argument("--top-p", type=PROBABILITY, help="overrides the preset")
    p.add_argument("--samples", type=COUNT, help="samples per problem (default: the paper's 32 or 4)")
    p.add_argument("--max-new-tokens", type=COUNT, help="response cap (default: the paper's 20,480; 64 for tiny)")
    p.add_argument("--limit", type=COUNT, help="only the first N problems of each benchmark")
    p.add_argument("--generate-batch", type=NON_NEGATIVE_INT, default=0,
                   help="sequences per generate call; 0: as many as the memory plan leaves room for")  # fmt: skip
    p.add_argument("--gpu-memory-gb", type=POSITIVE, help="memory to plan for (default: what is free on the device; "
                   "80 for --dry-run without a GPU)")  # fmt: skip
    p.add_argument("--dry-run", action="store_true", help="print the memory plan from the model's config alone, exit")
    p.add_argument("--prompt-format", choices=("chat", "plain"), default="chat", help="as in training")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                   help="weights and KV cache; auto: bf16 on CUDA, fp32 on CPU")  # fmt: skip
    grader_help = "rules: grade; math-verify (pip install math-verify); both: rules + agreement"
    p.add_argument("--grader", choices=GRADERS, default="rules", help=grader_help)
    p.add_argument("--judge", nargs="?", const=JUDGE, metavar="MODEL", help="an LLM verifier for the samples the "
                   f"rules grade wrong; a chat model's Hub id or folder (alone: {JUDGE}, the paper's)")  # fmt: skip
    p.add_argument("--device", type=DEVICE, default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output-dir", help="default: evals/<model>_t<temperature>_p<top-p>")
    args = p.parse_args(argv)
    if not args.model and not args.score:
        p.error("give --model to evaluate, or --score FILE to rebuild a table")
    if args.max_new_tokens is None:
        args.max_new_tokens = stapo.TINY_DEFAULTS["max_new_tokens"] if args.model == "tiny" else 20480
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.model and args.dry_run:  # no weights, no data: prompts up to the trainer's --max-prompt-tokens
        gpu = torch.device("cuda") if torch.cuda.is_available() else None
        return print(plan.eval_plan_line(eval_plan(args, gpu, stapo.Config().max_prompt_tokens), Path(args.model).name))
    gpus = torch.cuda.device_count()
    if (args.model or args.judge) and args.device.startswith("cuda") and gpus <= int(args.device[5:] or 0):
        raise SystemExit(f"--device {args.device}: this machine has {gpus} CUDA devices")
    if args.score:
        path = Path(args.score)  # the tables go beside it under its own name: a run's results.md stays as it is
        rows = read_generations(path)
        if not rows:
            raise SystemExit(f"{path}: no records: not a generations file of eval.py")
        if args.judge:
            judge_samples(rows, path, args, stapo.resolve_device(stapo.Config(device=args.device)))
        out = f"{path.stem}.score-{args.grader}{'-judged' * bool(args.judge)}"
        print(write_results(rows, path.with_name(f"{out}.json"), path.with_name(f"{out}.md"), args.grader, args.judge))
    else:
        print(evaluate(args))


if __name__ == "__main__":
    sys.exit(main())
