"""Tests for plot.py on hand-written run folders (no torch): `pytest -q test_plot.py`."""

import json
import struct
from pathlib import Path

import pytest

import plot


def write_run(folder: Path, mask: str, loss_agg: str = "token", steps: int = 5, torn: bool = False, reward=None):
    """A hand-written run folder: its config and `steps` metric records (tau_h None where S2T found nothing)."""
    folder.mkdir(parents=True)
    (folder / "stapo_config.json").write_text(json.dumps({"mask": mask, "loss_agg": loss_agg, "eps_high": 0.28}))
    records = [
        {"step": s, "reward": 0.1 * s if reward is None else reward(s), "entropy": 0.5, "len_mean": 100.0 + s,
         "n_spurious": int(mask == "s2t" and s % 2), "n_candidates": 3,
         "tau_h": 0.3 if mask == "s2t" and s > 1 else None,
         "truncated_frac": 0.01 * s, "clip_frac": 0.002, "grad_norm": 0.8 + 0.1 * s}
        for s in range(1, steps + 1)
    ]  # fmt: skip
    text = "".join(json.dumps(r) + "\n" for r in records)
    (folder / "metrics.jsonl").write_text(text + ('{"step": 6, "rew' if torn else ""))
    return folder


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from the PNG header: 8-byte signature, then the IHDR chunk."""
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR"
    return struct.unpack(">II", head[16:24])


def panel(fig, key: str):
    """The axes of one PANELS entry (the figure's first 8 axes, in PANELS order)."""
    return fig.axes[[k for k, _, _ in plot.PANELS].index(key)]


@pytest.mark.parametrize(
    "config, name",
    [
        ({"mask": "s2t", "loss_agg": "token"}, "STAPO"),
        ({"mask": "high-entropy", "loss_agg": "token"}, "20-Entropy"),
        ({"mask": "none", "loss_agg": "sequence", "eps_high": 0.2}, "GRPO"),
        ({"mask": "none", "loss_agg": "token"}, "JustRL"),  # DAPO-style token mean, no mask
    ],
)
def test_method_name(config, name):
    assert plot.method_name(config) == name


def test_writes_one_png_for_stapo_and_a_baseline(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    runs = [write_run(tmp_path / "stapo", "s2t", torn=True), write_run(tmp_path / "justrl", "none")]
    plot.main([str(r) for r in runs] + ["--out", str(tmp_path / "curves.png")])
    width, height = png_size(tmp_path / "curves.png")
    assert width >= 800 and height >= 400
    out, err = capsys.readouterr()
    assert out == f"wrote {tmp_path / 'curves.png'}\n" and "line 6 is cut short" in err


def test_defaults_to_the_current_folder(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    monkeypatch.chdir(tmp_path)
    assert plot.plot_runs([str(write_run(tmp_path / "run", "s2t"))]) == Path("stapo_curves.png")
    assert png_size(tmp_path / "stapo_curves.png")[0] > 0


def test_without_matplotlib_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(plot.sys.modules, "matplotlib", None)  # `import matplotlib...` now raises ImportError
    with pytest.raises(SystemExit, match="plot.py needs matplotlib: pip install matplotlib"):
        plot.plot_runs([str(write_run(tmp_path / "run", "s2t"))])


def test_names_a_bad_output_path_before_reading(tmp_path):
    run = write_run(tmp_path / "run", "s2t")
    for out in (tmp_path / "missing" / "x.png", run / "curves.jpg"):
        with pytest.raises(SystemExit, match="must be a .png file in an existing folder"):
            plot.plot_runs([str(run), str(tmp_path / "nowhere")], str(out))  # the bad --out comes first


def test_names_a_folder_that_is_not_a_run(tmp_path):
    with pytest.raises(SystemExit, match="nowhere: no metrics.jsonl and stapo_config.json"):
        plot.plot_runs([str(tmp_path / "nowhere")], str(tmp_path / "x.png"))


def test_read_jsonl_drops_a_torn_last_line_with_a_warning(tmp_path, capsys):
    path = write_run(tmp_path / "run", "s2t", steps=3, torn=True) / "metrics.jsonl"
    assert [r["step"] for r in plot.read_jsonl(path)] == [1, 2, 3]
    assert "metrics.jsonl: line 4 is cut short" in capsys.readouterr().err


@pytest.mark.parametrize(
    "tail, problem",
    [
        (b'{"step": 9, "rew\n', "line 4: not a JSON object"),  # cut short but ended by a newline: not a torn append
        (b'{"step": 9, "rew\n{"step": 10}\n', "line 4: not a JSON object"),  # a bad line in the middle
        (b"[1, 2]\n", "line 4: a JSON list, not an object"),
        (b"\xff\n", "line 4: not a JSON object in UTF-8"),
    ],
    ids=["ended-by-newline", "in-the-middle", "a-list", "not-utf8"],
)
def test_read_jsonl_names_file_and_line_of_a_bad_line(tmp_path, tail, problem):
    path = write_run(tmp_path / "run", "s2t", steps=3) / "metrics.jsonl"
    path.write_bytes(path.read_bytes() + tail)
    with pytest.raises(SystemExit, match=f"metrics.jsonl: {problem}"):
        plot.read_jsonl(path)


def test_flat_curves_get_plain_tick_labels_without_an_offset(tmp_path):
    pytest.importorskip("matplotlib")
    # Without useOffset=False, a reward of 5.53900..5.53904 shows ticks 0.00001 apart and an offset "+5.539".
    run = write_run(tmp_path / "flat", "none", reward=lambda s: 5.539 + 1e-5 * s)
    fig = plot.draw([plot.read_run(run)])
    fig.canvas.draw()
    for ax in fig.axes:
        assert ax.xaxis.get_offset_text().get_text() == "" and ax.yaxis.get_offset_text().get_text() == ""
    assert any(label.get_text().startswith("5.539") for label in panel(fig, "reward").get_yticklabels())


def test_a_panel_without_data_says_so(tmp_path):
    pytest.importorskip("matplotlib")
    fig = plot.draw([plot.read_run(write_run(tmp_path / "justrl", "none"))])  # no tau_h, no silenced token
    for key in ("tau_h", "n_spurious"):
        assert [t.get_text() for t in panel(fig, key).texts] == ["none in any run"]
        assert len(panel(fig, key).get_yticks()) == 0  # no made-up scale around 0
    assert all(not panel(fig, key).texts for key, _, _ in plot.PANELS if key not in ("tau_h", "n_spurious"))
    fig = plot.draw([plot.read_run(write_run(tmp_path / "stapo", "s2t"))])  # tau_h from step 2 on
    assert not panel(fig, "tau_h").texts


def test_seeds_of_a_method_are_their_mean_and_band_and_methods_differ_in_style(tmp_path):
    pytest.importorskip("matplotlib")
    runs = [write_run(tmp_path / f"stapo-{s}", "s2t", reward=lambda step, s=s: 0.1 * step + 0.2 * s) for s in (0, 1)]
    runs.append(write_run(tmp_path / "justrl", "none"))
    fig = plot.draw([plot.read_run(r) for r in runs], "the heading")
    assert fig.get_suptitle() == "the heading"  # not a panel's title
    reward = panel(fig, "reward")
    (stapo_line, justrl_line) = reward.get_lines()
    assert stapo_line.get_label() == "STAPO (2 seeds)" and justrl_line.get_label() == "JustRL (justrl)"
    assert list(stapo_line.get_ydata()) == pytest.approx([0.1 * s + 0.1 for s in range(1, 6)])  # the seeds' mean
    assert len(reward.collections) == 1  # the min-max band of STAPO's seeds; one run has none
    assert stapo_line.get_linestyle() != justrl_line.get_linestyle() and stapo_line.get_alpha() < 1
    tau_h = panel(fig, "tau_h").get_lines()[0]
    assert list(tau_h.get_xdata()) == [2, 3, 4, 5] and tau_h.get_marker() == "."  # connected over the steps it has


def test_the_summary_gives_mean_and_spread_per_method_and_says_whether_they_differ(tmp_path):
    runs = [write_run(tmp_path / f"stapo-{s}", "s2t", reward=lambda step, s=s: 0.5 + 0.1 * s) for s in (0, 1, 2)]
    runs += [write_run(tmp_path / f"justrl-{s}", "none", reward=lambda step, s=s: 0.9 + 0.01 * s) for s in (0, 1)]
    table = plot.summarize([plot.read_run(r) for r in runs])
    assert "| figure | STAPO (3 seeds) | JustRL (2 seeds) | difference |" in table
    assert "| reward, mean of the last 10 steps | 0.6 ± 0.1 | 0.905 ± 0.0071 | -0.305, beyond it |" in table
    assert "| largest gradient norm | 1.3 ± 0 | 1.3 ± 0 | within the spread of the seeds |" in table
    assert "| tokens silenced, all steps | 3 ± 0 | 0 ± 0 | +3, beyond it |" in table


@pytest.mark.slow  # trains: two runs of the CPU demo, one core each
def test_the_demo_trains_stapo_and_justrl_and_draws_them(tmp_path, capsys):
    """The experiment in a shortened form (one seed, 60 steps): STAPO silences tokens in correct answers and the
    reward rises (0.11 -> 0.47 here); JustRL silences none; the figure and the summary are written."""
    pytest.importorskip("matplotlib")
    plot.main(["--demo", "--seeds", "1", "--steps", "60", "--out-dir", str(tmp_path)])
    assert png_size(tmp_path / "demo.png")[0] >= 800
    assert "| figure | STAPO (1 seeds) | JustRL (1 seeds) | difference |" in (tmp_path / "summary.md").read_text()
    stapo_run, justrl = (plot.read_jsonl(tmp_path / f"{m}-seed0" / "metrics.jsonl") for m in ("stapo", "justrl"))
    mean = lambda records: sum(r["reward"] for r in records) / len(records)  # noqa: E731
    assert mean(stapo_run[:10]) < 0.3 and mean(stapo_run[-10:]) > mean(stapo_run[:10]) + 0.2
    silenced = plot.read_jsonl(tmp_path / "stapo-seed0" / "spurious.jsonl")
    assert silenced and all(s["A"] > 0 and s["p"] < 0.002 and s["H"] < s["tau_h"] for s in silenced)
    assert (tmp_path / "justrl-seed0" / "spurious.jsonl").read_text() == ""
    plot.main(["--demo", "--seeds", "1", "--steps", "60", "--out-dir", str(tmp_path)])  # finished runs are kept
    assert "stapo-seed0: done before" in capsys.readouterr().out
