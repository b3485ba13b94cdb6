"""The imperative shell around a pure train step: progress, logging, validation, checkpoints.

Everything numerical happens in `step_fn`; this loop only decides *when* to evaluate, log and
save, and reads metrics back from the device at log points (so the step itself never syncs).

Stopping: the first SIGINT (Ctrl-C) or SIGTERM (a scheduler's preemption) lets the current step
finish, saves a checkpoint of it and raises `Interrupted`; a second one aborts at once (the
optimizer updates buffers in place, so a half-done step is never saved).
"""

from __future__ import annotations

import json
import math
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from wmtp_fn.atomic import atomic_write_text
from wmtp_fn.errors import CheckpointError, Interrupted, NonFiniteError

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
# Metrics that are not averaged over a log interval: counters are summed, point values are the
# interval's last.
_SUMMED = ("n_tokens", "skipped")
_LAST = ("lr", "grad_norm")


@dataclass(frozen=True)
class LoopConfig:
    total_steps: int
    log_every: int = 10
    eval_every: int = 50  # 0: only at the start and the end
    save_every: int = 50  # 0: only at the end
    max_consecutive_skips: int = 10  # non-finite steps in a row before the run stops

    def __post_init__(self):
        for name in ("total_steps", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"LoopConfig.{name} must be >= 1, got {getattr(self, name)}")


@dataclass
class History:
    """What the run saw, for the summary line and for tests. The losses and skips cover the
    whole run (a resumed run reads the earlier ones back from the metrics log); `tokens` and
    `seconds` are this process's, from `start_step` on."""

    start_step: int = 0
    train_loss: list[tuple[int, float]] = field(default_factory=list)
    val_loss: list[tuple[int, float]] = field(default_factory=list)
    tokens: int = 0
    skipped: int = 0
    seconds: float = 0.0


class MetricsLog:
    """Append-only JSONL metrics file (one object per line, flushed as written)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: Mapping[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")

    def rewind(self, step: int) -> list[dict[str, Any]]:
        """Drop the rows a run continuing from `step` writes again, atomically, and return the
        rows kept: those up to `step`, or none when it starts at step 0 (which is evaluated
        again). A torn last line (the process was killed while writing it) is dropped too."""
        if not self.path.is_file():
            return []
        lines = self.path.read_text().splitlines()
        rows = []
        for i, line in enumerate(lines, 1):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                if i < len(lines):
                    raise CheckpointError(f"{self.path}:{i}: not a JSON metrics row") from None
        kept = [r for r in rows if r["step"] <= step] if step > 0 else []
        if len(kept) != len(lines):
            atomic_write_text(self.path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in kept))
        return kept


class NullLog(MetricsLog):
    """A metrics log that keeps nothing: what the ranks of a distributed run other than 0
    write to (rank 0 owns `metrics.jsonl`)."""

    def __init__(self):
        self.path = None

    def write(self, record: Mapping[str, Any]) -> None:
        pass

    def rewind(self, step: int) -> list[dict[str, Any]]:
        return []


@dataclass
class StopRequest:
    """Set by the first stop signal; the loop reads it between steps."""

    signum: int | None = None


@contextmanager
def stop_on_signals(signals: Sequence[int] = STOP_SIGNALS) -> Iterator[StopRequest]:
    """While inside: the first of `signals` only sets the yielded request's `signum`; a second
    raises `Interrupted(signum)` wherever the program is. The previous handlers come back on
    exit. Outside the main thread (where Python cannot install handlers) nothing changes."""
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return

    def handler(signum, frame):
        if request.signum is not None:
            raise Interrupted(signum)
        request.signum = signum

    previous = {s: signal.signal(s, handler) for s in signals}
    try:
        yield request
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def fit(
    state,
    cursor,
    *,
    step_fn: Callable,
    next_batch: Callable[[Any], tuple[list, Any]],
    evaluate: Callable[[Any], Mapping[str, float]] | None,
    save: Callable[[Any, Any, Mapping[str, Any]], None],
    cfg: LoopConfig,
    log: MetricsLog,
    desc: str = "train",
    quiet: bool = False,
) -> tuple[Any, Any, History]:
    """Run `step_fn` from `state.step` to `cfg.total_steps`.

    next_batch(cursor) -> (micro_batches, cursor); evaluate(state) -> {"val_loss": …} (the state,
    since an objective may read its `extra`); the state's `consecutive_skips` (kept on device by
    the step) stops the run after `cfg.max_consecutive_skips`;
    save(state, cursor, info) writes a checkpoint. The metrics log is first rewound to
    `state.step` (a resumed run logs no row twice). On a stop signal (see `stop_on_signals`)
    the finished step is saved and `Interrupted` raised. `quiet`: no progress bar and no
    validation lines (the ranks of a distributed run other than 0).
    """
    hist = _history(log.rewind(state.step), start_step=state.step)
    pending: list[Mapping[str, torch.Tensor]] = []  # metrics of the steps since the last row
    saved_step = None  # no second save of a step already on disk
    t_start = t_log = time.perf_counter()
    bar = tqdm(total=cfg.total_steps, initial=state.step, desc=desc, dynamic_ncols=True, mininterval=1.0, disable=quiet)
    try:
        with stop_on_signals() as stop:
            if evaluate is not None and state.step == 0:
                _evaluate(evaluate, state, log, hist, quiet)
            while state.step < cfg.total_steps:
                if stop.signum is not None:
                    if pending:  # log the steps since the last row, so none is lost
                        _log_row(_to_host(pending), state.step, time.perf_counter() - t_log, log, hist, bar)
                    if saved_step != state.step:
                        save(state, cursor, _info(hist))
                    raise Interrupted(stop.signum, state.step)
                micro_batches, cursor = next_batch(cursor)
                state, metrics = step_fn(state, micro_batches)
                pending.append(metrics)
                bar.update(1)
                step = state.step
                if step % cfg.log_every == 0 or step == cfg.total_steps:
                    rows = _to_host(pending)  # the one sync per interval
                    pending.clear()
                    consecutive_skips = int(state.consecutive_skips)  # kept in the state: a resume remembers it
                    if consecutive_skips >= cfg.max_consecutive_skips:
                        raise NonFiniteError(
                            f"{consecutive_skips} consecutive steps up to step {step} had a non-finite loss or "
                            "gradient and were skipped; stopping (lower the learning rate or check the data)"
                        )
                    now = time.perf_counter()
                    _log_row(rows, step, now - t_log, log, hist, bar)
                    t_log = now
                last = step == cfg.total_steps
                if evaluate is not None and (last or (cfg.eval_every and step % cfg.eval_every == 0)):
                    _evaluate(evaluate, state, log, hist, quiet)
                if last or (cfg.save_every and step % cfg.save_every == 0):
                    save(state, cursor, _info(hist))
                    saved_step = step
    finally:
        bar.close()
        hist.seconds = time.perf_counter() - t_start
    return state, cursor, hist


def _log_row(rows: Sequence[Mapping[str, float]], step: int, seconds: float, log: MetricsLog, hist: History, bar) -> None:
    """Write the row of the steps up to `step` (their metrics `rows`, taking `seconds`)."""
    n_tok = int(sum(r.get("n_tokens", 0) for r in rows))
    hist.tokens += n_tok
    hist.skipped += sum(r.get("skipped", 0) > 0 for r in rows)
    record = {"step": step, "tokens_per_s": n_tok / max(seconds, 1e-9), **_interval(rows)}
    log.write(record)
    hist.train_loss.append((step, record["loss"]))
    bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:,.0f}", refresh=False)


def _to_host(pending: Sequence[Mapping[str, Any]]) -> list[dict[str, float]]:
    """Per-step metric dicts -> plain floats, with one device-to-host copy per device.
    A `[]` metric keeps its name; a `[K]` one becomes `name/0 … name/K-1`."""
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    layout = []  # (row, name, device, start, numel, is_vector)
    offsets: dict[torch.device, int] = {}
    for i, metrics in enumerate(pending):
        for name, value in metrics.items():
            t = torch.as_tensor(value).detach()
            flat = t.reshape(-1).double()
            by_device.setdefault(t.device, []).append(flat)
            start = offsets.get(t.device, 0)
            offsets[t.device] = start + flat.numel()
            layout.append((i, name, t.device, start, flat.numel(), t.dim() > 0))
    host = {d: torch.cat(ts).tolist() for d, ts in by_device.items()}
    rows: list[dict[str, float]] = [{} for _ in pending]
    for i, name, device, start, n, vector in layout:
        values = host[device][start : start + n]
        if vector:
            rows[i].update({f"{name}/{k}": v for k, v in enumerate(values)})
        else:
            rows[i][name] = values[0]
    return rows


def _interval(rows: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """One log record of the steps since the last: counters summed, `lr`/`grad_norm` from the last
    step, every other metric averaged over the steps that were not skipped (`loss` is NaN when
    all were)."""
    good = [r for r in rows if not r.get("skipped", 0)]
    out: dict[str, float] = {"loss": math.nan}
    for name in dict.fromkeys(k for r in rows for k in r):
        if name == "n_tokens":
            continue  # summed into tokens_per_s
        if name in _SUMMED:
            out[name] = sum(r.get(name, 0) for r in rows)
        elif name in _LAST:
            out[name] = rows[-1][name]
        else:
            values = [r[name] for r in good if name in r]
            if values:
                out[name] = sum(values) / len(values)
    return out


def _history(rows: Sequence[Mapping[str, Any]], *, start_step: int) -> History:
    """The History of the rows already logged by earlier processes of this run."""
    hist = History(start_step=start_step)
    for r in rows:
        if "loss" in r:
            hist.train_loss.append((r["step"], r["loss"]))
            hist.skipped += int(r.get("skipped", 0))
        if "val_loss" in r:
            hist.val_loss.append((r["step"], r["val_loss"]))
    return hist


def _evaluate(evaluate, state, log: MetricsLog, hist: History, quiet: bool = False) -> None:
    metrics = dict(evaluate(state))
    log.write({"step": state.step, **metrics})
    if "val_loss" in metrics:
        hist.val_loss.append((state.step, metrics["val_loss"]))
        if not quiet:
            tqdm.write(f"step {state.step}: " + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))


def _info(hist: History) -> dict[str, Any]:
    return {
        "train_loss": hist.train_loss[-1][1] if hist.train_loss else None,
        "val_loss": hist.val_loss[-1][1] if hist.val_loss else None,
    }
