"""Curves of finished STAPO runs, one PNG; and the CPU demo as a small experiment over seeds.

    python plot.py RUN_DIR [RUN_DIR ...] [--out FILE]     # one line per run; runs of one method over seeds:
                                                          # their mean and min-max band
    python plot.py --demo [--seeds 5] [--steps 120]       # trains the CPU demo, STAPO and JustRL, each seed,
                                                          # two runs at a time; then runs/demo/demo.png + summary.md

One panel per metric of metrics.jsonl, named by the paper's method from each run's stapo_config.json. Reads run
folders only and starts stapo.py as a subprocess (no torch, no stapo import); needs matplotlib.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

# One panel per metric: (key in metrics.jsonl, title, factor).
PANELS = [
    ("reward", "reward (mean over B)", 1), ("entropy", "entropy H (nats)", 1),
    ("n_spurious", "silenced tokens per step", 1), ("tau_h", "tau_h (S2T entropy threshold)", 1),
    ("len_mean", "response length (tokens)", 1), ("truncated_frac", "truncated responses (%)", 100),
    ("clip_frac", "clipped tokens (%)", 100), ("grad_norm", "gradient norm (before clipping)", 1),
]  # fmt: skip
STYLES = {"STAPO": ("tab:blue", "-"), "JustRL": ("tab:orange", "--"), "20-Entropy": ("tab:green", "-."),
          "GRPO": ("tab:red", ":")}  # fmt: skip
DEMO = "--model tiny-sft --lr 1e-3 --max-new-tokens 16".split()  # README's CPU demo, without --steps and --seed


def method_name(config: dict) -> str:
    """The paper's name for a run, from its stapo_config.json."""
    if config.get("mask") == "s2t":
        return "STAPO"
    if config.get("mask") == "high-entropy":
        return "20-Entropy"
    return "GRPO" if config.get("loss_agg") == "sequence" else "JustRL"


def read_jsonl(path: Path) -> list[dict]:
    """One object per line; a torn last line (no newline, does not parse) is dropped, any other bad line exits."""
    lines = path.read_bytes().split(b"\n")  # the last item is b"" when the file ends with a newline
    records = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line.decode("utf-8"))
            problem = None if isinstance(record, dict) else f"a JSON {type(record).__name__}, not an object"
        except ValueError as e:  # UnicodeDecodeError and JSONDecodeError are both ValueErrors
            problem = f"not a JSON object in UTF-8 ({e})"
        if problem is None:
            records.append(record)
        elif n == len(lines):
            print(f"warning: {path}: line {n} is cut short (a crash while writing?); dropped", file=sys.stderr)
        else:
            raise SystemExit(f"{path}: line {n}: {problem}")
    return records


def read_run(folder: Path) -> tuple[str, str, list[dict]]:
    """(method, folder name, metric records) of one run folder."""
    if not (folder / "metrics.jsonl").exists() or not (folder / "stapo_config.json").exists():
        raise SystemExit(f"{folder}: no metrics.jsonl and stapo_config.json here; is it a stapo run folder?")
    try:
        config = json.loads((folder / "stapo_config.json").read_text())
    except ValueError as e:
        raise SystemExit(f"{folder / 'stapo_config.json'}: not JSON ({e})") from None
    return method_name(config), folder.resolve().name, read_jsonl(folder / "metrics.jsonl")


def draw(runs: list[tuple[str, str, list[dict]]], heading: str = ""):
    """A matplotlib Figure: 2x4 panels. A method with one run is a line; with several (seeds), their mean per step
    and a band from their min to their max. Each method has its colour and line style, so overlaps stay visible."""
    try:
        from matplotlib import figure  # from the package itself: fails even where a test left submodules cached
        from matplotlib.backends import backend_agg
    except ImportError:
        raise SystemExit("plot.py needs matplotlib: pip install matplotlib") from None
    fig = backend_agg.FigureCanvasAgg(figure.Figure(figsize=(18, 7.5))).figure  # files only: no window, no pyplot
    axes = fig.subplots(2, 4, sharex=True)
    methods = {method: [(name, r) for m, name, r in runs if m == method] for method, _, _ in runs}
    for ax, (key, title, factor) in zip(axes.flat, PANELS, strict=True):
        for method, group in methods.items():
            color, style = STYLES.get(method, ("tab:gray", "-"))
            steps = sorted({r["step"] for _, records in group for r in records})
            values = {s: [r[key] * factor for _, records in group for r in records if r["step"] == s and
                          r.get(key) is not None] for s in steps}  # fmt: skip
            shown = [s for s in steps if values[s]]  # None (tau_h without candidates) is left out, not a gap
            label = f"{method} ({len(group)} seeds)" if len(group) > 1 else f"{method} ({group[0][0]})"
            ax.plot(shown, [statistics.fmean(values[s]) for s in shown], style, color=color, label=label,
                    linewidth=1.3, alpha=0.85, marker="." if key == "tau_h" else None, markersize=4)  # fmt: skip
            if len(group) > 1:
                ax.fill_between(shown, [min(values[s]) for s in shown], [max(values[s]) for s in shown],
                                color=color, alpha=0.15, linewidth=0)  # fmt: skip
        if all(not r.get(key) for _, _, records in runs for r in records):  # None or 0 in every step of every run
            ax.text(0.5, 0.75, "none in any run", transform=ax.transAxes, ha="center", va="center", color="gray")
            ax.set_yticks([])  # not a meaningless 0 +- 0.04 scale
        ax.ticklabel_format(useOffset=False, style="plain")  # flat runs: 5.53901, not "+5.539" and 1e-5 ticks
        ax.set_title(title, fontsize=10)
    fig.supxlabel("step", fontsize=10)
    fig.suptitle(heading, y=0.995, fontsize=11)
    fig.legend(*axes[0, 0].get_legend_handles_labels(), loc="upper center", bbox_to_anchor=(0.5, 0.96),
               ncol=min(4, len(methods)), frameon=False)  # fmt: skip
    fig.tight_layout(rect=(0, 0, 1, 0.91))  # leave the top for the title and the legend
    return fig


def plot_runs(run_dirs: list[str], out: str | None = None) -> Path:
    """Curves of STAPO and its baselines side by side: one PNG."""
    path = Path(out or "stapo_curves.png")
    if path.suffix != ".png" or not path.parent.is_dir():  # before any reading or drawing
        raise SystemExit(f"--out {path}: must be a .png file in an existing folder")
    draw([read_run(Path(d)) for d in run_dirs]).savefig(path, dpi=100)
    return path


# ----------------------------------------------------------------------------------------------
# The CPU demo as an experiment: STAPO and JustRL from the same taught tiny model, over seeds

SUMMARY = [  # (label, value of one run from its metric records)
    ("reward, mean of the last 10 steps", lambda m: statistics.fmean(r["reward"] for r in m[-10:])),
    ("largest entropy H", lambda m: max(r["entropy"] for r in m)),
    ("largest gradient norm", lambda m: max(r["grad_norm"] for r in m)),
    ("tokens silenced, all steps", lambda m: sum(r["n_spurious"] for r in m)),
    ("S2T candidates, all steps", lambda m: sum(r["n_candidates"] for r in m)),
]


def summarize(runs: list[tuple[str, str, list[dict]]]) -> str:
    """A table: each summary figure per method, the mean and standard deviation over its seeds, and whether the two
    methods differ by more than the seeds spread (more than the larger of their two standard deviations)."""
    methods = {m: [records for method, _, records in runs if method == m] for m, _, _ in runs}
    lines = ["| figure | " + " | ".join(f"{m} ({len(g)} seeds)" for m, g in methods.items()) + " | difference |",
             "|---" * (len(methods) + 2) + "|"]  # fmt: skip
    for label, value in SUMMARY:
        stats = [(statistics.fmean(v), statistics.stdev(v) if len(v) > 1 else 0.0)
                 for v in ([value(m) for m in group] for group in methods.values())]  # fmt: skip
        (a, sa), (b, sb) = (stats + stats)[:2]
        verdict = "within the spread of the seeds" if abs(a - b) <= max(sa, sb) else f"{a - b:+.3g}, beyond it"
        lines.append(f"| {label} | " + " | ".join(f"{mean:.3g} ± {std:.2g}" for mean, std in stats) + f" | {verdict} |")
    return "\n".join(lines)


def demo(seeds: int, steps: int, out_dir: Path, jobs: int = 2) -> Path:
    """Each seed's STAPO and JustRL run of the CPU demo (finished runs are kept), `jobs` at a time with one thread
    each; then the figure and the summary beside them."""
    here, env = Path(__file__).parent, {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    runs = [(out_dir / f"{name}-seed{seed}", [*DEMO, "--steps", str(steps), "--seed", str(seed), *flags])
            for seed in range(seeds) for name, flags in (("stapo", []), ("justrl", ["--mask", "none"]))]  # fmt: skip

    def train(run: tuple[Path, list[str]]):
        folder, flags = run
        if (folder / f"step-{steps:06d}").exists():
            return print(f"{folder.name}: done before", flush=True)
        if folder.exists():
            raise SystemExit(f"{folder}: an unfinished run; remove it, or give another --out-dir")
        log = (out_dir / f"{folder.name}.log").open("w")
        code = subprocess.call([sys.executable, "stapo.py", *flags, "--output-dir", str(folder)], cwd=here, env=env,
                               stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
        if code:
            raise SystemExit(f"{folder.name}: stapo.py exited with {code}; see {log.name}")
        print(f"{folder.name}: done", flush=True)

    out_dir.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(jobs) as pool:
        list(pool.map(train, runs))
    read = [read_run(folder) for folder, _ in runs]
    fig = draw(read, f"The CPU demo: tiny-sft, {seeds} seeds per method, {steps} steps")
    fig.savefig(out_dir / "demo.png", dpi=100)
    table = summarize(read)
    (out_dir / "summary.md").write_text(table + "\n")
    print(f"{table}\nwrote {out_dir / 'demo.png'} and {out_dir / 'summary.md'}")
    return out_dir / "demo.png"


def main(argv=None):
    parser = argparse.ArgumentParser(description="curves of finished stapo runs, one PNG (needs matplotlib)")
    parser.add_argument("run_dirs", nargs="*", metavar="RUN_DIR", help="a folder of a stapo run")
    parser.add_argument("--out", help="the PNG to write (default: stapo_curves.png)")
    parser.add_argument("--demo", action="store_true", help="train the CPU demo over seeds, then draw it")
    parser.add_argument("--seeds", type=int, default=5, help="--demo: seeds per method")
    parser.add_argument("--steps", type=int, default=120, help="--demo: steps per run")
    parser.add_argument("--out-dir", default="runs/demo", help="--demo: the folder of its runs, figure and summary")
    args = parser.parse_args(argv)
    if args.demo:
        if args.seeds < 1 or args.steps < 10:
            parser.error("--seeds must be at least 1 and --steps at least 10")
        return demo(args.seeds, args.steps, Path(args.out_dir), jobs=max(1, min(2, os.cpu_count() or 1)))
    if not args.run_dirs:
        parser.error("give RUN_DIR folders, or --demo")
    print(f"wrote {plot_runs(args.run_dirs, args.out)}")


if __name__ == "__main__":
    main()
