"""The imperative shell around a pure train step: progress, logging, validation, checkpoints.

Everything numerical happens in `step_fn`; this loop only decides *when* to evaluate, log and
save, and reads metrics back from the device at log points (so the step itself never syncs).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm


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
    """What the loop saw, for the summary line and for tests."""

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
) -> tuple[Any, Any, History]:
    """Run `step_fn` from `state.step` to `cfg.total_steps`.

    next_batch(cursor) -> (micro_batches, cursor); evaluate(params) -> {"val_loss": …};
    save(state, cursor, info) writes a checkpoint. Ctrl-C saves a checkpoint of the last
    completed step before re-raising, so an interrupted run resumes where it stopped.
    """
    hist = History()
    if evaluate is not None and state.step == 0:
        _evaluate(evaluate, state, log, hist)
    pending: list[dict[str, torch.Tensor]] = []
    consecutive_skips = 0
    bar = tqdm(total=cfg.total_steps, initial=state.step, desc=desc, dynamic_ncols=True, mininterval=1.0)
    t_log, tokens_since = time.perf_counter(), 0
    t_start = t_log
    in_step = False
    saved_step = None  # no second save of a step already on disk (e.g. on Ctrl-C right after one)
    try:
        while state.step < cfg.total_steps:
            micro_batches, next_cursor = next_batch(cursor)
            in_step = True  # the optimizer updates buffers in place: a half-done step is not saved
            state, metrics = step_fn(state, micro_batches)
            in_step = False
            cursor = next_cursor
            pending.append(metrics)
            bar.update(1)
            step = state.step
            if step % cfg.log_every == 0 or step == cfg.total_steps:
                rows = [{k: float(v) for k, v in m.items()} for m in pending]  # the one sync per interval
                pending.clear()
                now = time.perf_counter()
                n_tok = int(sum(r.get("n_tokens", 0) for r in rows))
                tokens_since += n_tok
                hist.tokens += n_tok
                for r in rows:
                    skipped = r.get("skipped", 0) > 0
                    hist.skipped += skipped
                    consecutive_skips = consecutive_skips + 1 if skipped else 0
                if consecutive_skips >= cfg.max_consecutive_skips:
                    raise FloatingPointError(
                        f"{consecutive_skips} consecutive steps up to step {step} had a non-finite loss or "
                        "gradient and were skipped; stopping (lower the learning rate or check the data)"
                    )
                good = [r for r in rows if not r.get("skipped", 0)]
                loss = sum(r["loss"] for r in good) / len(good) if good else math.nan
                tps = tokens_since / max(now - t_log, 1e-9)
                record = {"step": step, "loss": loss, "tokens_per_s": tps, "skipped": sum(r.get("skipped", 0) for r in rows)}
                for key in ("grad_norm", "lr"):
                    if key in rows[-1]:
                        record[key] = rows[-1][key]
                log.write(record)
                hist.train_loss.append((step, loss))
                bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tps:,.0f}", refresh=False)
                t_log, tokens_since = now, 0
            last = step == cfg.total_steps
            if evaluate is not None and (last or (cfg.eval_every and step % cfg.eval_every == 0)):
                _evaluate(evaluate, state, log, hist)
            if last or (cfg.save_every and step % cfg.save_every == 0):
                save(state, cursor, _info(hist))
                saved_step = step
    except KeyboardInterrupt:
        bar.close()
        if in_step:
            print("\ninterrupted inside a step: keeping the last saved checkpoint; run again to resume from it")
        elif saved_step != state.step:
            save(state, cursor, _info(hist))
            print(f"\ninterrupted: saved a checkpoint at step {state.step}; run again to resume")
        raise
    finally:
        bar.close()
        hist.seconds = time.perf_counter() - t_start
    return state, cursor, hist


def _evaluate(evaluate, state, log: MetricsLog, hist: History) -> None:
    metrics = dict(evaluate(state.params))
    log.write({"step": state.step, **metrics})
    if "val_loss" in metrics:
        hist.val_loss.append((state.step, metrics["val_loss"]))
        tqdm.write(f"step {state.step}: " + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))


def _info(hist: History) -> dict[str, Any]:
    return {
        "train_loss": hist.train_loss[-1][1] if hist.train_loss else None,
        "val_loss": hist.val_loss[-1][1] if hist.val_loss else None,
    }
