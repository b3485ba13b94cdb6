"""Every notebook (notebooks/*.py, jupytext percent format) runs top to bottom as a script in a
scratch directory, so none can rot; each asserts its own result in its last cells (e.g. the
adapter interpolation at alpha = 0 reproduces adapter A's per-token losses exactly)."""

import runpy
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")
import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.py"))


def test_there_are_notebooks():
    assert {p.stem for p in NOTEBOOKS} >= {"adapters_are_data", "rho1_selection", "critic_weights"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_top_to_bottom(path, tmp_path, monkeypatch):
    text = path.read_text()
    assert text.startswith("# %% [markdown]\n# # "), f"{path.name}: open with a markdown title cell (jupytext percent)"
    assert "\nfrom tests" not in text and "\nimport tests" not in text, f"{path.name}: a notebook must not import tests/"
    monkeypatch.chdir(tmp_path)
    try:
        namespace = runpy.run_path(str(path), run_name="__main__")
    finally:
        plt.close("all")
    assert list(tmp_path.rglob("*.png")), f"{path.name}: saves its figure (under runs/)"
    assert namespace.get("BASE_PATH") == "", f"{path.name}: BASE_PATH = '' at the top selects the embedded base"
