"""Score a model on the six math benchmarks of the STAPO paper (arXiv 2602.15620v4, Sec. 5).

AIME24, AIME25, AMC23 with 32 samples per problem, MATH500, Minerva, OlympiadBench with 4.
Prompt, generation and the verifier are those of stapo.py: one definition of "correct".
`--grader math-verify` re-scores the same samples with HF's math-verify (optional package);
`--grader both` adds its avg@k and the share of samples the two graders agree on.
Reported per benchmark: avg@k (mean accuracy over the k samples, the paper's number), unbiased
pass@k for k = 1, 2, 4, ..., the share of answers without \\boxed{}, mean length, truncation rate;
and "Avg", the unweighted mean of the benchmarks' avg@k.

A benchmark's samples form one queue, sorted by prompt length and cut into as few generate calls as
the memory plan allows (no --batch-size): bf16 weights on a GPU (nothing is trained: no fp32 copy) and
per sequence its KV cache and sampler memory; `--dry-run` prints the plan line from the model's config.
Every sample is appended to <output-dir>/generations.jsonl when its call is done; rerunning the
same command skips finished calls (each call has its own seed, so the final table is the same
as without the interruption). A rerun with any other setting, the plan's sequences per call
included, is refused (settings.json).
`--score FILE` rebuilds the table from a generations file without a model, into
<FILE stem>.score-<grader>.md/.json beside FILE, so it never overwrites a run's results.md.

    python eval.py --model runs/stapo/step-000200                # all six, from the Hub
    python eval.py --model tiny --data-dir ../shared/benchmarks --limit 5
    python eval.py --model Qwen/Qwen3-14B --dry-run              # does it fit one GPU?
    python eval.py --score evals/stapo-step-000200_t1.0_p1.0/generations.jsonl --grader both
"""

import argparse
import inspect
import json
import math
import sys
import time
import zlib
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

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
PRESETS = {"t1.0": (1.0, 1.0), "t0.7": (0.7, 0.9)}  # (temperature, top-p): the paper's two settings
GRADERS = ("regex", "math-verify", "both")  # regex: stapo.verify, the reward of training
MATH_VERIFY_SECONDS = 5  # per math-verify parse or compare call (its own default); a timeout counts as wrong
RECORD_FIELDS = {"benchmark": str, "problem_idx": int, "sample_idx": int, "gold": str, "extracted": (str, type(None)),
                 "correct": bool, "length": int, "truncated": bool, "completion": str}  # fmt: skip


# ----------------------------------------------------------------------------------------------
# Data


def benchmark_example(name: str, row: dict) -> dict | None:
    """A benchmark row -> {"problem", "answer"}, with each file's quirks undone; None without an answer."""
    example = stapo.row_to_example(row)  # problem/question; answer, final_answer[0], or Minerva's last \boxed{}
    if example is None:
        return None
    if name == "aime25":  # "\frac" and "\triangle" lost their backslash to JSON escapes: \f, \t
        example["problem"] = example["problem"].replace("\x0c", "\\f").replace("\t", "\\t")
    example["answer"] = example["answer"].strip().strip("$").strip()  # OlympiadBench: $...$
    return example if example["answer"] else None


def load_benchmark(name: str, data_dir: str | Path | None = None) -> list[dict]:
    if name not in BENCHMARKS:
        raise SystemExit(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}")
    bench = BENCHMARKS[name]
    if data_dir is not None:
        path = Path(data_dir) / bench.file
        if not path.is_file():
            raise SystemExit(f"{path} not found: --data-dir must hold {', '.join(b.file for b in BENCHMARKS.values())}")
        source, unit, rows = path, "line", stapo.jsonl_objects(path)[0]
    else:
        import datasets

        try:
            source, unit, rows = bench.hub_id, "row", enumerate(datasets.load_dataset(bench.hub_id, split=bench.split))
        except (OSError, ValueError) as e:  # offline: ConnectionError; a missing set: DatasetNotFoundError
            raise SystemExit(f"{name}: cannot load {bench.hub_id} from the Hugging Face Hub ({type(e).__name__}): "
                             "pass --data-dir, a folder of the six offline jsonl files") from None  # fmt: skip
    examples = []
    for n, row in rows:
        example = benchmark_example(name, row)
        if example is None:
            fields = ", ".join(sorted(row))
            raise SystemExit(f"{source}: {unit} {n}: no problem text or no usable answer (fields: {fields})")
        examples.append(example)
    if not examples:
        raise SystemExit(f"{source}: no problems")
    return examples


def read_generations(path: Path) -> tuple[list[dict], int]:
    """The records of a generations file and the byte length of its whole lines; SystemExit if it is not one."""
    if not path.is_file():
        raise SystemExit(f"{path}: not a file")
    objects, size = stapo.jsonl_objects(path, torn_tail_ok=True)
    seen = {}
    for n, r in objects:
        bad = [k for k, kind in RECORD_FIELDS.items() if not isinstance(r.get(k, ...), kind)]
        if bad:
            raise SystemExit(f"{path}: line {n}: not a generation record of eval.py (missing or mistyped: {bad})")
        if r["benchmark"] not in BENCHMARKS:
            raise SystemExit(f"{path}: line {n}: unknown benchmark {r['benchmark']!r}; known: {', '.join(BENCHMARKS)}")
        key = (r["benchmark"], r["problem_idx"], r["sample_idx"])
        if key in seen:  # counting it twice would weigh one problem more than the others
            raise SystemExit(f"{path}: line {n} repeats {key} of line {seen[key]}")
        seen[key] = n
    return [r for _, r in objects], size


# ----------------------------------------------------------------------------------------------
# Metrics


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k = 1 - C(n-c, k) / C(n, k), with n samples of which c are correct."""
    if n - c < k:
        return 1.0
    return 1.0 - math.prod((n - c - i) / (n - i) for i in range(k))


def score_rows(rows: list[dict], grader: str = "regex") -> dict:
    """Per-benchmark metrics from generation records; with math-verify, its verdict is each r["math_verify"]."""
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
        if grader != "regex":
            m["math_verify_timeouts"] = sum(r["math_verify"] == "timeout" for r in mine)
            m["math_verify_errors"] = sum(r["math_verify"] == "error" for r in mine)
    results["Avg"] = sum(m[f"avg@{m['samples']}"] for m in results.values()) / max(1, len(results))
    results["grader"] = grader
    return results


def markdown_table(results: dict) -> str:
    benchmarks = {name: m for name, m in results.items() if isinstance(m, dict)}
    grader = results.get("grader", "regex")
    ks = sorted({int(k[5:]) for m in benchmarks.values() for k in m if k.startswith("pass@")})
    both = ["math-verify avg@k", "agreement"] if grader == "both" else []
    timeouts = ["math-verify timeouts/errors"] if grader != "regex" else []
    head = ["benchmark", "problems", "avg@k", *both, *[f"pass@{k}" for k in ks], "no box", "mean len", "truncated",
            *timeouts]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, m in benchmarks.items():
        k = m["samples"]
        row = [name, str(m["problems"]), f"{100 * m[f'avg@{k}']:.1f} (k={k})"]
        if both:
            row += [f"{100 * m[f'math_verify_avg@{k}']:.1f}", f"{100 * m['agreement']:.1f}"]
        row += [f"{100 * m[f'pass@{k}']:.1f}" if f"pass@{k}" in m else "" for k in ks]
        row += [f"{100 * m['no_box']:.1f}", f"{m['mean_length']:.0f}", f"{100 * m['truncated']:.1f}"]
        if timeouts:
            row.append(f"{m['math_verify_timeouts']}/{m['math_verify_errors']}")
        lines.append("| " + " | ".join(row) + " |")
    graded, avg = "regex" if grader == "both" else grader, 100 * results["Avg"]
    lines.append(f"\nAvg (unweighted mean of avg@k over {len(benchmarks)} benchmarks, graded by {graded}): {avg:.1f}")
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


def write_results(rows: list[dict], json_path: Path, md_path: Path, grader: str) -> str:
    if grader != "regex":
        for r, verdict in zip(rows, math_verify_verdicts(rows), strict=True):
            r["math_verify"] = verdict
    results = score_rows(rows, grader)
    table = markdown_table(results)
    json_path.write_text(json.dumps(results, indent=2))
    md_path.write_text(table + "\n")
    return f"{table}\nwrote {md_path} and {json_path}"


# ----------------------------------------------------------------------------------------------
# Generation


def memory_plan(args, device: torch.device | None, prompt_tokens: int) -> dict:
    """Bytes on device (None: a GPU of --gpu-memory-gb or 80 GB): the weights, 2 or 4 a parameter (no gradients,
    no AdamW), and per sequence of a generate call its KV cache and the sampler's fp32 logits and prefill
    transients, as stapo.plan_memory counts them. --kv-cache-gb 0: as many sequences as HEADROOM leaves room for."""
    c, seq = stapo.load_model_config(args.model), prompt_tokens + args.max_new_tokens
    bf16 = args.precision == "bf16" or (args.precision == "auto" and (device is None or device.type == "cuda"))
    device_bytes = stapo.device_memory(stapo.Config(gpu_memory_gb=args.gpu_memory_gb or (0 if device else 80)), device)
    weights, kv_per_seq = (2 if bf16 else 4) * stapo.parameter_count(c), seq * stapo.kv_bytes_per_token(c, bf16)
    sampling_per_seq = stapo.sampler_bytes_per_sequence(c, prompt_tokens)
    free = args.kv_cache_gb * 1e9 or stapo.HEADROOM * device_bytes - weights
    n = max(1, int(free // (kv_per_seq + (0 if args.kv_cache_gb else sampling_per_seq))))
    return {"bf16": bf16, "weights": weights, "sequences_per_call": n, "tokens_per_sequence": seq,
            "kv_cache": n * kv_per_seq, "sampling": n * sampling_per_seq, "budget": stapo.HEADROOM * device_bytes,
            "total": weights + n * (kv_per_seq + sampling_per_seq)}  # fmt: skip


def plan_line(plan: dict, name: str) -> str:
    fits, gb = "fits" if plan["total"] <= plan["budget"] else "DOES NOT FIT", 1e9
    return (f"plan: {name} weights {plan['weights'] / gb:.1f} GB ({'bf16' if plan['bf16'] else 'fp32'}) + KV "
            f"{plan['kv_cache'] / gb:.1f} GB + sampler {plan['sampling'] / gb:.1f} GB for {plan['sequences_per_call']} "
            f"sequences of {plan['tokens_per_sequence']:,} tokens per generate call = {plan['total'] / gb:.1f} GB "
            f"of {plan['budget'] / gb:.1f} GB ({fits})")  # fmt: skip


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
    done, whole = read_generations(gen_path)
    data = gen_path.read_bytes()
    if data and not data.endswith(b"\n"):  # a kill during an append: drop the torn line, or end a whole one
        stapo.replace_file(gen_path, data[:whole] if whole < len(data) else data + b"\n")
    return gen_path, {(r["benchmark"], r["problem_idx"], r["sample_idx"]): r["correct"] for r in done}


def sample_benchmark(model, tokenizer, name: str, examples: list[dict], prompts: list, k: int, plan: dict,
                     cfg, seed: int, gen_path: Path, have: dict):  # fmt: skip
    """k samples of every problem: one queue of (problem, sample) items sorted by prompt length (less padding),
    cut into as few generate calls as the plan allows, evenly filled, each seeded by its index; calls whose
    samples are all in `have` are skipped, the others' new samples added."""
    items = sorted(((i, j) for i in range(len(examples)) for j in range(k)), key=lambda item: len(prompts[item[0]]))
    calls = math.ceil(len(items) / plan["sequences_per_call"])
    bar = tqdm(total=len(items), desc=f"{name} samples", disable=None)
    for c in range(calls):
        call = items[c * len(items) // calls : (c + 1) * len(items) // calls]
        if all((name, i, j) in have for i, j in call):
            bar.update(len(call))
            continue
        torch.manual_seed(call_seed(seed, name, c))  # a call's samples do not depend on what ran before
        rollouts = stapo.generate(model, tokenizer, [prompts[i] for i, _ in call], cfg, f"generate {c + 1}/{calls}",
                                  kv_cache_bytes=plan["kv_cache"])  # fmt: skip
        records = []
        for row, (i, j) in enumerate(call):
            if (name, i, j) in have:
                continue
            ids = rollouts.completions[row, rollouts.completion_mask[row]]
            text, gold = tokenizer.decode(ids, skip_special_tokens=True), examples[i]["answer"]
            records.append({"benchmark": name, "problem_idx": i, "sample_idx": j, "gold": gold,
                            "extracted": stapo.extract_boxed(text), "correct": stapo.verify(text, gold),
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
    if args.grader != "regex":
        load_math_verify()  # missing: say so now, not after hours of sampling
    device = stapo.resolve_device(stapo.Config(device=args.device))
    # Everything that changes a sample or a score: the device type because precision "auto" and the kernels
    # depend on it, and (below) the plan's sequences per call because it cuts the queue into generate calls.
    data = str(Path(args.data_dir).resolve()) if args.data_dir else "hub"
    settings = {"model": args.model, "temperature": temperature, "top_p": top_p, "max_new_tokens": args.max_new_tokens,
                "seed": args.seed, "prompt_format": args.prompt_format, "samples": args.samples, "limit": args.limit,
                "data": data, "precision": args.precision, "device": device.type, "grader": args.grader}  # fmt: skip
    name = "-".join(Path(args.model).parts[-2:]) if Path(args.model).name.startswith("step-") else Path(args.model).name
    out_dir = Path(args.output_dir or f"evals/{name}_t{temperature}_p{top_p}")  # runs/stapo/step-N: stapo-step-N
    refuse_other_settings(out_dir, settings)  # now, before the tokenizer and the plan are loaded
    benchmarks = {name: load_benchmark(name, args.data_dir)[: args.limit] for name in names}  # bad files fail here
    tokenizer = stapo.load_tokenizer(args.model)
    prompts = {name: [stapo.encode_prompt(e["problem"], tokenizer, args.prompt_format) for e in examples]
               for name, examples in benchmarks.items()}  # fmt: skip
    plan = memory_plan(args, device, max(len(p) for ps in prompts.values() for p in ps))
    line = plan_line(plan, Path(args.model).name)
    print(line, flush=True)
    if plan["total"] > plan["budget"]:  # before a run folder is made
        fixes = ["--kv-cache-gb 0"] * (args.kv_cache_gb > 0) + ["--precision bf16"] * (not plan["bf16"])
        raise SystemExit(f"{line}: refused; try {' or '.join([*fixes, 'a shorter --max-new-tokens', 'more memory'])}")
    gen_path, have = open_run(out_dir, settings | {"sequences_per_call": plan["sequences_per_call"]})
    print(f"eval: writing to {out_dir.resolve()}", flush=True)  # flushed: a batch job's log shows it at once

    model = stapo.load_model(args.model, device, tokenizer, dtype=torch.bfloat16 if plan["bf16"] else torch.float32)
    cfg = stapo.Config(temperature=temperature, top_p=top_p, max_new_tokens=args.max_new_tokens,
                       precision="bf16-autocast" if plan["bf16"] else "fp32")  # fmt: skip
    wanted = set()
    for name, examples in benchmarks.items():
        k, start = args.samples or BENCHMARKS[name].samples, time.perf_counter()  # samples None: the paper's number
        keys = sample_benchmark(model, tokenizer, name, examples, prompts[name], k, plan, cfg, args.seed, gen_path,
                                have)  # fmt: skip
        wanted |= keys
        avg = sum(have[key] for key in keys) / len(keys)
        print(f"{name} | {len(examples)} problems x {k} samples | avg@{k} {100 * avg:.1f} (regex) | "
              f"{time.perf_counter() - start:.0f}s", flush=True)  # fmt: skip
    rows = [r for r in read_generations(gen_path)[0] if (r["benchmark"], r["problem_idx"], r["sample_idx"]) in wanted]
    return write_results(rows, out_dir / "results.json", out_dir / "results.md", args.grader)


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
NON_NEGATIVE = number(float, "a number >= 0", lambda v: 0 <= v < math.inf)
PROBABILITY = number(float, "a number in (0, 1]", lambda v: 0 < v <= 1)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", help="HF id, checkpoint folder, or 'tiny' (random CPU model)")
    p.add_argument("--score", metavar="FILE", help="score a generations file into <stem>.score-<grader>.md beside it")
    p.add_argument("--benchmarks", help=f"comma-separated subset of {','.join(BENCHMARKS)} (default: all)")
    p.add_argument("--data-dir", help="folder of local jsonl copies (default: the Hub ids)")
    p.add_argument("--preset", choices=PRESETS, default="t1.0", help="t1.0: temperature 1.0, top-p 1.0; t0.7: 0.7/0.9")
    p.add_argument("--temperature", type=POSITIVE, help="overrides the preset")
    p.add_argument("--top-p", type=PROBABILITY, help="overrides the preset")
    p.add_argument("--samples", type=COUNT, help="samples per problem (default: the paper's 32 or 4)")
    p.add_argument("--max-new-tokens", type=COUNT, help="response cap (default: the paper's 20,480; 64 for tiny)")
    p.add_argument("--limit", type=COUNT, help="only the first N problems of each benchmark")
    p.add_argument("--kv-cache-gb", type=NON_NEGATIVE, default=0.0,
                   help="KV-cache budget of one generate call; 0: what the memory plan leaves free")  # fmt: skip
    p.add_argument("--gpu-memory-gb", type=POSITIVE, help="memory to plan for (default: what is free on the device; "
                   "80 for --dry-run without a GPU)")  # fmt: skip
    p.add_argument("--dry-run", action="store_true", help="print the memory plan from the model's config alone, exit")
    p.add_argument("--prompt-format", choices=("chat", "plain"), default="chat", help="as in training")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                   help="weights and KV cache; auto: bf16 on CUDA, fp32 on CPU")  # fmt: skip
    grader_help = "regex: stapo.py's verifier; math-verify (pip install math-verify); both: regex + agreement"
    p.add_argument("--grader", choices=GRADERS, default="regex", help=grader_help)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
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
    stapo.quiet_libraries()
    if args.model and args.dry_run:  # no weights, no data: prompts up to the trainer's --max-prompt-tokens
        gpu = torch.device("cuda") if torch.cuda.is_available() else None
        return print(plan_line(memory_plan(args, gpu, stapo.Config().max_prompt_tokens), Path(args.model).name))
    if args.model and args.device.startswith("cuda") and torch.cuda.device_count() <= int(args.device[5:] or 0):
        raise SystemExit(f"--device {args.device}: this machine has {torch.cuda.device_count()} CUDA devices")
    if args.score:
        path = Path(args.score)  # the tables go beside it under its own name: a run's results.md stays as it is
        rows = read_generations(path)[0]
        if not rows:
            raise SystemExit(f"{path}: no records: not a generations file of eval.py")
        out = f"{path.stem}.score-{args.grader}"
        print(write_results(rows, path.with_name(f"{out}.json"), path.with_name(f"{out}.md"), args.grader))
    else:
        print(evaluate(args))


if __name__ == "__main__":
    sys.exit(main())
