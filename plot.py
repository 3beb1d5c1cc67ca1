"""Curves of finished STAPO runs, one PNG: `python plot.py RUN_DIR [RUN_DIR ...] [--out FILE]`.

One panel per metric of metrics.jsonl, one line per run, named by the paper's method from its stapo_config.json.
Reads run folders only (no torch, no stapo import); needs matplotlib. Tests: `pytest -q test_plot.py`.
"""

import argparse
import json
import sys
from pathlib import Path

# One panel per metric: (key in metrics.jsonl, title, factor). One line per run, the same colour in every panel.
PANELS = [
    ("reward", "reward (mean over B)", 1), ("entropy", "entropy H (nats)", 1),
    ("spurious_frac", "silenced tokens (%)", 100), ("tau_h", "tau_h (S2T entropy threshold)", 1),
    ("len_mean", "response length (tokens)", 1), ("truncated_frac", "truncated responses (%)", 100),
    ("clip_frac", "clipped tokens (%)", 100), ("grad_norm", "gradient norm (before clipping)", 1),
]  # fmt: skip


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


def read_run(folder: Path) -> tuple[str, list[dict]]:
    """(legend label, metric records) of one run folder."""
    if not (folder / "metrics.jsonl").exists() or not (folder / "stapo_config.json").exists():
        raise SystemExit(f"{folder}: no metrics.jsonl and stapo_config.json here; is it a stapo run folder?")
    try:
        config = json.loads((folder / "stapo_config.json").read_text())
    except ValueError as e:
        raise SystemExit(f"{folder / 'stapo_config.json'}: not JSON ({e})") from None
    return f"{method_name(config)} ({folder.resolve().name})", read_jsonl(folder / "metrics.jsonl")


def draw(runs: list[tuple[str, list[dict]]]):
    """A matplotlib Figure: 2x4 panels, one line per (label, records) run; None values are gaps."""
    try:
        from matplotlib import figure  # from the package itself: fails even where a test left submodules cached
        from matplotlib.backends import backend_agg
    except ImportError:
        raise SystemExit("plot.py needs matplotlib: pip install matplotlib") from None
    fig = backend_agg.FigureCanvasAgg(figure.Figure(figsize=(18, 7.5))).figure  # files only: no window, no pyplot
    axes = fig.subplots(2, 4, sharex=True)
    for ax, (key, title, factor) in zip(axes.flat, PANELS, strict=True):
        for label, records in runs:
            values = [r[key] * factor if r.get(key) is not None else float("nan") for r in records]
            ax.plot([r["step"] for r in records], values, label=label, linewidth=1.2, marker=".", markersize=3)
        if all(r.get(key) is None for _, records in runs for r in records):  # e.g. tau_h of runs that silence nothing
            ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", va="center", color="gray")
            ax.set_yticks([])  # not a meaningless 0 +- 0.04 scale
        ax.ticklabel_format(useOffset=False, style="plain")  # flat runs: 5.53901, not "+5.539" and 1e-5 ticks
        ax.set_title(title, fontsize=10)
    fig.supxlabel("step", fontsize=10)
    fig.legend(*axes[0, 0].get_legend_handles_labels(), loc="upper center", ncol=min(4, len(runs)), frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.93))  # leave the top for the legend
    return fig


def plot_runs(run_dirs: list[str], out: str | None = None) -> Path:
    """Curves of STAPO and its baselines side by side: one PNG, one line per run."""
    path = Path(out or "stapo_curves.png")
    if path.suffix != ".png" or not path.parent.is_dir():  # before any reading or drawing
        raise SystemExit(f"--out {path}: must be a .png file in an existing folder")
    draw([read_run(Path(d)) for d in run_dirs]).savefig(path, dpi=100)
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(description="curves of finished stapo runs, one PNG (needs matplotlib)")
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="a folder of a stapo run")
    parser.add_argument("--out", help="the PNG to write (default: stapo_curves.png)")
    args = parser.parse_args(argv)
    print(f"wrote {plot_runs(args.run_dirs, args.out)}")


if __name__ == "__main__":
    main()
