"""The run report on real runs: a tiny ref_tuning and a tiny verifiable run (critic built as the
verifiable pipeline test builds it), the figures' line data against metrics.jsonl read here with
json, the PNGs decoded, report.md's final values, and the one-line errors."""

import json
import re

import numpy as np
import pytest

pytest.importorskip("matplotlib")
import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.image  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402

from tests.pipelines.experiment import experiment  # noqa: E402
from tests.pipelines.test_verifiable import config as verifiable_config  # noqa: E402
from tests.pipelines.test_verifiable import mtp_critic  # noqa: E402
from wmtp_fn import report  # noqa: E402
from wmtp_fn.run import run_config  # noqa: E402


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(ref_tuning run dir, verifiable run dir), each trained a few steps on the embedded base."""
    root = tmp_path_factory.mktemp("report")
    ref = root / "ref"
    run_config(experiment("ref_tuning", ref, **{"base.tiny_hidden_size": 64, "base.tiny_layers": 1,
                                                "train.steps": 6, "train.log_every": 1, "train.eval_every": 3}))
    critic = mtp_critic(root / "critic")
    ver = root / "ver"
    run_config(verifiable_config(ver, critic, **{"train.steps": 4, "train.eval_every": 2}))
    return ref, ver


def jsonl(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def logged(rows, key):
    """(steps, values) of `key` straight from the rows (these runs log each step once)."""
    pairs = sorted((r["step"], r[key]) for r in rows if key in r)
    return [s for s, _ in pairs], [v for _, v in pairs]


def test_series_keeps_the_last_value_of_a_relogged_step_and_sorts_by_step():
    rows = [{"step": 2, "loss": 5.0}, {"step": 1, "loss": 7.0}, {"step": 2, "loss": 4.0},
            {"step": 3, "val_loss": 1.0}, {"step": 4, "loss": "nan?"}]
    assert report.series(rows, "loss") == ([1, 2], [7.0, 4.0])
    assert report.final_values(rows) == {"loss": (2, 4.0), "val_loss": (3, 1.0)}


def test_figures_draw_exactly_the_logged_metrics_of_each_run(runs):
    ref, ver = runs
    labelled = [(str(ref), report.read_rows(ref)), (str(ver), report.read_rows(ver))]
    checked = set()
    for stem, title, panels in report.FIGURES:
        fig = report.figure(labelled, title, panels)
        if fig is None:
            continue
        for ax in fig.axes:
            for line in ax.get_lines():
                label, key = line.get_label().rsplit(" ", 1)
                steps, values = logged(jsonl(ref if label == str(ref) else ver), key)
                assert steps, (stem, key)
                np.testing.assert_array_equal(line.get_xdata(), steps)
                np.testing.assert_array_equal(line.get_ydata(), values)
                checked.add((stem, label == str(ref), key))
        plt.close(fig)
    # each run's loss curves, the verifiable run's per-head CE and TD weights are among them
    for expected in [("loss", True, "val_loss"), ("loss", True, "loss"), ("loss", False, "val_loss"),
                     ("head_ce", False, "ce/2"), ("head_ce", False, "val_ce/0"), ("lr", True, "lr"),
                     ("tokens_per_s", False, "tokens_per_s"), ("td_weights", False, "w_clip_ratio"),
                     ("td_weights", False, "val_w_mean")]:
        assert expected in checked
    assert not any(stem == "td_weights" and is_ref for stem, is_ref, _ in checked)


def test_the_command_writes_decodable_images_and_the_final_values(runs, tmp_path, capsys):
    ref, ver = runs
    out = tmp_path / "out"
    assert report.main([str(ref), str(ver), "--out", str(out)]) == 0
    names = {p.name for p in out.iterdir()}
    assert names == {"loss.png", "head_ce.png", "lr.png", "tokens_per_s.png", "td_weights.png", "report.md"}
    for name in names - {"report.md"}:
        image = matplotlib.image.imread(out / name)
        assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 300, name
        assert image[..., :3].std() > 0.05, name  # not a blank canvas
    md = (out / "report.md").read_text()
    for run_dir in (ref, ver):
        rows = jsonl(run_dir)
        section = md.split(f"## {run_dir}\n", 1)[1].split("\n## ", 1)[0]
        vals = [r["val_loss"] for r in rows if "val_loss" in r]
        first, last = re.search(r"val_loss: first (\S+), last (\S+)", section).groups()
        assert (float(first), float(last)) == (vals[0], vals[-1])
        assert f"| val_loss | {rows[-1]['step']} | {vals[-1]!r} |" in section
        last_loss = [r for r in rows if "loss" in r][-1]
        assert f"| loss | {last_loss['step']} | {last_loss['loss']!r} |" in section
        assert f"- steps: {max(r['step'] for r in rows)} " in section


def test_a_directory_without_metrics_is_one_error_naming_it(tmp_path, capsys):
    assert report.main([str(tmp_path), "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(tmp_path) in err and "metrics.jsonl" in err
    assert not (tmp_path / "out").exists()


def test_a_malformed_line_names_the_file_and_line(tmp_path, capsys):
    (tmp_path / "metrics.jsonl").write_text('{"step": 0, "val_loss": 1.0}\n{"loss": 2.0}\n')
    assert report.main([str(tmp_path)]) == 1
    assert f"{tmp_path / 'metrics.jsonl'}:2:" in capsys.readouterr().err


def test_without_matplotlib_the_command_names_the_pip_command(tmp_path, monkeypatch, capsys):
    (tmp_path / "metrics.jsonl").write_text('{"step": 0, "val_loss": 1.0}\n')
    import builtins

    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.split(".")[0] == "matplotlib":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    assert report.main([str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install 'matplotlib>=3.8'" in err
