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
         "spurious_frac": 1e-4 if mask == "s2t" else 0.0, "tau_h": 0.3 if mask == "s2t" and s > 1 else None,
         "truncated_frac": 0.01 * s, "clip_frac": 0.002, "grad_norm": 0.8}
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
    fig = plot.draw([plot.read_run(write_run(tmp_path / "justrl", "none"))])  # tau_h is None at every step
    assert [t.get_text() for t in panel(fig, "tau_h").texts] == ["no data"]
    assert len(panel(fig, "tau_h").get_yticks()) == 0  # no made-up scale around 0
    assert all(not ax.texts for ax in fig.axes if ax is not panel(fig, "tau_h"))
    fig = plot.draw([plot.read_run(write_run(tmp_path / "stapo", "s2t"))])  # tau_h from step 2 on
    assert not panel(fig, "tau_h").texts
