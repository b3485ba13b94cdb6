"""Learning-rate schedule: golden values worked out by hand, HF parity, config errors."""

import math

import pytest
from transformers import get_cosine_schedule_with_warmup, get_linear_schedule_with_warmup
import torch

from wmtp_fn.schedule import ScheduleConfig, lr_at

BASE = 1e-3


@pytest.mark.parametrize(
    "kind, step, expected",
    [
        # warm-up 10, total 110, min ratio 0.1: warm-up is base·step/10 for every kind
        ("cosine", 0, 0.0),
        ("cosine", 5, 5e-4),
        ("linear", 3, 3e-4),
        ("constant", 9, 9e-4),
        ("cosine", 10, 1e-3),
        # progress 0.25: cosine 0.1 + 0.9·(1 + cos(π/4))/2 = 0.1 + 0.9·0.8535534 = 0.8681981
        ("cosine", 35, 8.681980515339464e-4),
        # progress 0.25: linear 0.1 + 0.9·0.75 = 0.775
        ("linear", 35, 7.75e-4),
        # progress 0.5: both 0.1 + 0.9·0.5 = 0.55
        ("cosine", 60, 5.5e-4),
        ("linear", 60, 5.5e-4),
        # end and beyond: the floor 0.1·base
        ("cosine", 110, 1e-4),
        ("linear", 110, 1e-4),
        ("cosine", 500, 1e-4),
        ("linear", 500, 1e-4),
        ("constant", 10, 1e-3),
        ("constant", 500, 1e-3),
    ],
)
def test_golden_values(kind, step, expected):
    cfg = ScheduleConfig(kind=kind, warmup_steps=10, total_steps=110, min_lr_ratio=0.1)
    assert lr_at(step, BASE, cfg) == pytest.approx(expected, rel=1e-12, abs=1e-18)


def test_no_warmup_starts_at_base():
    cfg = ScheduleConfig(kind="cosine", warmup_steps=0, total_steps=4, min_lr_ratio=0.0)
    # progress 0, 1/4, 1/2, 3/4, 1 -> (1 + cos πp)/2 = 1, 0.8535534, 0.5, 0.1464466, 0
    got = [lr_at(s, 1.0, cfg) for s in range(5)]
    assert got == pytest.approx([1.0, 0.8535533905932737, 0.5, 0.14644660940672627, 0.0], abs=1e-15)


@pytest.mark.parametrize("kind", ["cosine", "linear"])
def test_matches_transformers_schedules(kind):
    """Independent reference: HF's LambdaLR schedules (min ratio 0)."""
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=BASE)
    make = get_cosine_schedule_with_warmup if kind == "cosine" else get_linear_schedule_with_warmup
    sched = make(opt, num_warmup_steps=7, num_training_steps=50)
    cfg = ScheduleConfig(kind=kind, warmup_steps=7, total_steps=50, min_lr_ratio=0.0)
    for step in range(50):
        assert lr_at(step, BASE, cfg) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-12, abs=1e-18)
        opt.step()
        sched.step()


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(kind="exp"),
        dict(warmup_steps=-1, total_steps=5),
        dict(warmup_steps=1.5, total_steps=5),
        dict(kind="cosine", warmup_steps=5, total_steps=5),
        dict(kind="linear", warmup_steps=6, total_steps=5),
        dict(min_lr_ratio=1.5, total_steps=5),
        dict(min_lr_ratio=-0.1, total_steps=5),
    ],
)
def test_bad_config_raises(kwargs):
    with pytest.raises(ValueError):
        ScheduleConfig(**kwargs)


def test_constant_allows_any_total():
    cfg = ScheduleConfig(kind="constant", warmup_steps=5, total_steps=0)
    assert lr_at(7, 2.0, cfg) == 2.0


@pytest.mark.parametrize("step, base", [(-1, 1.0), (1.0, 1.0), (True, 1.0), (1, -1.0), (1, math.nan)])
def test_bad_call_raises(step, base):
    with pytest.raises(ValueError):
        lr_at(step, base, ScheduleConfig(total_steps=10))
