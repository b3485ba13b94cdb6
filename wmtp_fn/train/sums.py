"""Additive partial sums shared by the train step and ``evaluate``: normalisers over
micro-batches and ranks, metric sums accumulated per micro-batch and reduced in one
collective, and the named-count division (the rule is in ``wmtp_fn.objectives``)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from wmtp_fn.dist.comm import Comm
from wmtp_fn.objectives import COUNT

STEP_METRICS = ("loss", "grad_norm", "lr", "n_tokens", "skipped")
"""The names the train step reports itself (``evaluate``: ``loss``, ``n_tokens``); an
objective's metrics may not use them."""


def total_counts(count: Callable[[Any], Tensor], micro_batches: Sequence[Any], comm: Comm) -> Tensor:
    """``N [K]``: ``Σ_mb count(mb)`` summed over ranks (masks only, before any forward)."""
    per = [count(mb) for mb in micro_batches]
    for i, c in enumerate(per):
        if not isinstance(c, Tensor) or c.dim() != 1 or c.shape != per[0].shape:
            got = tuple(c.shape) if isinstance(c, Tensor) else type(c).__name__
            raise ValueError(
                f"objective.count must return a [K] tensor for every micro-batch; micro-batch {i} gave {got}"
                + (f", micro-batch 0 {tuple(per[0].shape)}" if i else "")
            )
    return comm.sum_(torch.stack(per).sum(0))


def check_sums(sums: Tensor, counts: Tensor) -> Tensor:
    """``sums`` of one ``objective.loss`` call, which must be ``[K]`` like the counts."""
    if not isinstance(sums, Tensor) or sums.shape != counts.shape:
        got = tuple(sums.shape) if isinstance(sums, Tensor) else type(sums).__name__
        raise ValueError(f"objective.loss returned sums of shape {got}, objective.count counts {tuple(counts.shape)}")
    return sums


def add_metrics(total: dict[str, Tensor], metrics: Mapping[str, Any], device: torch.device, index: int) -> dict[str, Tensor]:
    """``total + metrics`` (micro-batch ``index``'s sums), as ``[]`` / ``[K]`` fp32 on ``device``.

    Every micro-batch must report the same names and shapes: a metric missing from one of
    them would be silently under-counted.
    """
    new = {}
    for name, v in metrics.items():
        if not isinstance(name, str) or "/" in name:
            raise ValueError(f"metric name {name!r} must be a str without '/' (loggers write [K] vectors as name/k)")
        if name in STEP_METRICS:
            raise ValueError(f"objective metric {name!r} collides with the train-step metrics {STEP_METRICS}")
        if isinstance(v, Tensor) and v.dim() <= 1:
            new[name] = v.detach().to(device, torch.float32)
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            new[name] = torch.tensor(float(v), device=device)
        else:
            got = f"a tensor of shape {tuple(v.shape)}" if isinstance(v, Tensor) else type(v).__name__
            raise ValueError(f"metric {name!r} must be a [] or [K] tensor or a number (a sum), got {got}")
    if index == 0:
        return new
    if new.keys() != total.keys():
        raise ValueError(
            f"micro-batch {index} returned metrics {sorted(new)}, micro-batch 0 {sorted(total)}; "
            "every micro-batch must report the same sums"
        )
    for name, v in new.items():
        if v.shape != total[name].shape:
            raise ValueError(f"metric {name!r} has shape {tuple(v.shape)} in micro-batch {index}, {tuple(total[name].shape)} before")
    return {name: total[name] + v for name, v in new.items()}


def sum_over_ranks(loss_sums: Tensor, metrics: dict[str, Tensor], comm: Comm) -> tuple[Tensor, dict[str, Tensor]]:
    """The loss sums ``[K]`` and the metric sums (fp32, one device) summed over ranks with
    **one** collective."""
    if comm.world_size == 1:
        return loss_sums, metrics
    parts = [loss_sums, *metrics.values()]
    flat = comm.sum_(torch.cat([v.reshape(-1) for v in parts]))
    chunks = [c.view(v.shape) for c, v in zip(flat.split([v.numel() for v in parts]), parts)]
    return chunks[0], dict(zip(metrics, chunks[1:]))


def divide(sums: dict[str, Tensor], counts: Tensor, means: Mapping[str, str]) -> dict[str, Tensor]:
    """The reported metrics: ``sums`` with each ``means`` entry ``name -> denom`` replaced by
    ``sums[name] / (counts if denom == COUNT else sums[denom])``, elementwise, 0 where the
    denominator is 0. A denominator with as many elements as the numerator takes its shape
    (``[1]`` counts divide a ``[]`` sum); a single-element one broadcasts."""
    out = dict(sums)
    for name, denom in means.items():
        if name not in sums:
            raise ValueError(f"objective.means divides metric {name!r}, but the loss returned only {sorted(sums)}")
        if denom != COUNT and denom not in sums:
            raise ValueError(
                f"objective.means divides {name!r} by {denom!r}, which is neither {COUNT!r} nor a metric of the loss {sorted(sums)}"
            )
        n = sums[name]
        d = (counts if denom == COUNT else sums[denom]).to(n.device, torch.float32)
        if d.numel() == n.numel():
            d = d.reshape(n.shape)
        elif d.numel() == 1:
            d = d.reshape(())
        else:
            raise ValueError(f"metric {name!r} {tuple(n.shape)} cannot be divided by {denom!r} {tuple(d.shape)}")
        out[name] = torch.where(d > 0, n / d, 0.0)
    return out


def to_host(metrics: Mapping[str, Tensor]) -> dict[str, float]:
    """``{name: float}`` with one host sync; a ``[K]`` vector ``v`` becomes ``name/k: v[k]``."""
    if not metrics:
        return {}
    device = next(iter(metrics.values())).device
    dtype = torch.float32 if device.type == "mps" else torch.float64  # exact token counts past 2**24
    values = torch.cat([v.detach().reshape(-1).to(device, dtype) for v in metrics.values()]).cpu().tolist()
    out, i = {}, 0
    for name, v in metrics.items():
        if v.dim() == 0:
            out[name] = values[i]
        else:
            out.update({f"{name}/{k}": values[i + k] for k in range(v.numel())})
        i += v.numel()
    return out
