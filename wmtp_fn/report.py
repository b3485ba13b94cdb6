"""Plots and a Markdown summary of one or more runs, read from their ``metrics.jsonl``.

    python -m wmtp_fn.report RUN_DIR [RUN_DIR ...] [--out DIR]

``metrics.jsonl`` has one JSON object per line, each with a ``step``: training rows (``loss``,
``lr``, ``tokens_per_s``, ``grad_norm``, per-head ``ce/k``, ...) and validation rows (``val_loss``,
``val_*``). Each figure below is drawn when at least one run logged one of its keys; several runs
are overlaid, one colour per run, the legend naming each run directory:

    loss.png          loss and val_loss
    head_ce.png       per-head ce/k and val_ce/k
    lr.png            lr
    tokens_per_s.png  tokens_per_s
    td_weights.png    TD weight statistics (w_mean, w_std, w_clip_ratio, ...; train and val)
    selection.png     Rho-1 selection (ratio/k, threshold/k, overall_ratio)
    critic.png        val_pairwise_accuracy, val_auc

``report.md`` lists per run its steps, first and last validation loss and the final value of
every logged metric, and links the figures. Every file is written atomically. matplotlib is an
optional extra (``pip install 'wmtp_fn[report]'``); it draws with the Agg backend (no display).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from wmtp_fn.atomic import atomic_file, atomic_write_text
from wmtp_fn.errors import WmtpError

Rows = list[dict]
Run = tuple[str, Rows]  # (the label: the run directory as given, its metrics rows)
PIP_HINT = "pip install 'matplotlib>=3.8' (or the extra: pip install 'wmtp_fn[report]')"


class ReportError(WmtpError, ValueError):
    """A run directory or metrics file the report cannot read."""


# --- reading ----------------------------------------------------------------------------------


def read_rows(run_dir: Path) -> Rows:
    """The rows of ``run_dir/metrics.jsonl`` in file order; each must be an object with a ``step``."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise ReportError(f"{run_dir}: no metrics.jsonl (expected a run directory written by python -m wmtp_fn)")
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ReportError(f"{path}:{n}: not JSON ({e.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("step"), int):
            raise ReportError(f"{path}:{n}: expected an object with an integer 'step'")
        rows.append(row)
    return rows


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def series(rows: Rows, key: str) -> tuple[list[int], list[float]]:
    """``(steps, values)`` of ``key``, sorted by step; a step logged twice (a resumed run
    re-logs it) keeps its last value. Rows without ``key`` or with a non-number are skipped."""
    by_step: dict[int, float] = {}
    for row in rows:
        if is_number(row.get(key)):
            by_step[row["step"]] = float(row[key])
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def final_values(rows: Rows) -> dict[str, tuple[int, float]]:
    """Every numeric metric's ``(step, value)`` at the last step it was logged, sorted by key."""
    keys = {k for row in rows for k, v in row.items() if k != "step" and is_number(v)}
    out = {}
    for key in sorted(keys, key=metric_order):
        steps, values = series(rows, key)
        out[key] = (steps[-1], values[-1])
    return out


def metric_order(key: str):
    """Sort ``ce/10`` after ``ce/2``: by name, then head number."""
    name, _, head = key.partition("/")
    return (name, int(head) if head.isdigit() else -1, head)


# --- what is plotted --------------------------------------------------------------------------

# A figure: (file stem, title, panels); a panel: (title, the keys it draws, found in the rows).
Panel = tuple[str, Callable[[set[str]], list[str]]]


def matching(pattern: str) -> Callable[[set[str]], list[str]]:
    regex = re.compile(pattern)
    return lambda keys: sorted((k for k in keys if regex.fullmatch(k)), key=metric_order)


def exactly(*names: str) -> Callable[[set[str]], list[str]]:
    return lambda keys: [k for k in names if k in keys]


W_STATS = ("w_mean", "w_std", "w_min", "w_max", "w_clip_ratio", "w_normalized_entropy")
FIGURES: tuple[tuple[str, str, tuple[Panel, ...]], ...] = (
    ("loss", "loss", (("train and validation loss", exactly("loss", "val_loss")),)),
    ("head_ce", "per-head cross-entropy", (("train ce/k", matching(r"ce/\d+")), ("validation val_ce/k", matching(r"val_ce/\d+")))),
    ("lr", "learning rate", (("lr", exactly("lr")),)),
    ("tokens_per_s", "throughput", (("tokens/s", exactly("tokens_per_s")),)),
    ("td_weights", "TD weight statistics", tuple((s, exactly(s, f"val_{s}")) for s in W_STATS)),
    ("selection", "Rho-1 selection", (("selected ratio per head", matching(r"(val_)?ratio/\d+")),
                                      ("threshold per head", matching(r"(val_)?threshold/\d+")),
                                      ("overall ratio", exactly("overall_ratio", "val_overall_ratio")))),
    ("critic", "critic validation", (("pairwise accuracy", exactly("val_pairwise_accuracy")), ("AUC", exactly("val_auc")))),
)


def panel_keys(runs: Sequence[Run], keys_of: Callable[[set[str]], list[str]]) -> list[str]:
    """The keys a panel draws: those any run logged, in the panel's order."""
    logged = {k for _, rows in runs for row in rows for k, v in row.items() if is_number(v)}
    return keys_of(logged)


def figure(runs: Sequence[Run], title: str, panels: Sequence[Panel]):
    """A matplotlib Figure with one axis per non-empty panel; on each, one line per (run, key):
    colour by run, line style by key, label ``"<run> <key>"``. None when no panel has data."""
    import matplotlib.pyplot as plt

    drawn = [(name, keys) for name, keys_of in panels if (keys := panel_keys(runs, keys_of))]
    if not drawn:
        return None
    cols = min(len(drawn), 3)
    nrows = math.ceil(len(drawn) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(5.5 * cols, 3.8 * nrows), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    styles = ("-", "--", ":", "-.")
    for ax, (name, keys) in zip(axes.flat, drawn):
        for r, (label, rows) in enumerate(runs):
            for k, key in enumerate(keys):
                steps, values = series(rows, key)
                if steps:
                    ax.plot(steps, values, color=colours[r % len(colours)], linestyle=styles[k % len(styles)],
                            marker="o" if len(steps) < 30 else None, markersize=3, label=f"{label} {key}")
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(drawn):]:
        ax.set_visible(False)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


# --- writing ----------------------------------------------------------------------------------


def summary(runs: Sequence[Run], images: Sequence[str]) -> str:
    """``report.md``: per run its steps, first/last validation loss and every final value."""
    lines = ["# Run report", ""]
    for name in images:
        lines += [f"![{name}]({name})", ""]
    for label, rows in runs:
        steps = [row["step"] for row in rows]
        _, val = series(rows, "val_loss")
        lines += [f"## {label}", "", f"- steps: {max(steps) if steps else 0} ({len(rows)} rows)"]
        if val:
            lines.append(f"- val_loss: first {val[0]!r}, last {val[-1]!r}")
        lines += ["", "| metric | step | final value |", "|---|---:|---:|"]
        lines += [f"| {key} | {step} | {value!r} |" for key, (step, value) in final_values(rows).items()]
        lines.append("")
    return "\n".join(lines)


def write_report(run_dirs: Sequence[Path], out: Path) -> list[Path]:
    """Read every run, write the figures that have data and ``report.md`` into ``out``; returns
    the paths written (report.md last). Raises ReportError on a bad run dir or no matplotlib."""
    runs = [(str(d), read_rows(Path(d))) for d in run_dirs]
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ReportError(f"the report needs matplotlib, which is not installed: {PIP_HINT}") from None
    out = Path(out)
    written = []
    for stem, title, panels in FIGURES:
        fig = figure(runs, title, panels)
        if fig is None:
            continue
        path = out / f"{stem}.png"
        with atomic_file(path) as tmp:
            fig.savefig(tmp, format="png", dpi=100)
        plt.close(fig)
        written.append(path)
    md = out / "report.md"
    atomic_write_text(md, summary(runs, [p.name for p in written]))
    return [*written, md]


def default_out(run_dirs: Sequence[Path]) -> Path:
    """``RUN_DIR/report`` for one run; ``<their common parent>/report`` for several."""
    if len(run_dirs) == 1:
        return Path(run_dirs[0]) / "report"
    return Path(os.path.commonpath([os.path.abspath(d) for d in run_dirs])) / "report"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m wmtp_fn.report", description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR")
    parser.add_argument("--out", type=Path, help="where to write (default RUN_DIR/report, or the runs' common parent/report)")
    args = parser.parse_args(argv)
    try:
        written = write_report(args.run_dirs, args.out or default_out(args.run_dirs))
    except WmtpError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    print(f"report: {len(written) - 1} figures and {written[-1]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
