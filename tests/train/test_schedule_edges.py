"""Schedule edges: the exact error messages, and the boundary values that are allowed
(min_lr_ratio 1, base_lr 0) computing what they should."""

import pytest

from wmtp_fn.schedule import ScheduleConfig, lr_at


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(kind="exp"), "ScheduleConfig.kind must be one of ('cosine', 'linear', 'constant'), got 'exp'"),
        (dict(warmup_steps=-1, total_steps=5), "ScheduleConfig.warmup_steps must be an int >= 0, got -1"),
        (dict(warmup_steps=True, total_steps=5), "ScheduleConfig.warmup_steps must be an int >= 0, got True"),
        (dict(total_steps=2.0), "ScheduleConfig.total_steps must be an int >= 0, got 2.0"),
        (dict(kind="linear", warmup_steps=5, total_steps=5),
         "ScheduleConfig(kind='linear') needs total_steps > warmup_steps, got total_steps=5, warmup_steps=5"),
        (dict(min_lr_ratio=1.01, total_steps=5), "ScheduleConfig.min_lr_ratio must be in [0, 1], got 1.01"),
    ],
)
def test_bad_config_message(kwargs, message):
    with pytest.raises(ValueError) as info:
        ScheduleConfig(**kwargs)
    assert str(info.value) == message


@pytest.mark.parametrize(
    "step, base, message",
    [(-1, 1.0, "step must be an int >= 0, got -1"), (2.0, 1.0, "step must be an int >= 0, got 2.0"),
     (1, -0.5, "base_lr must be finite and >= 0, got -0.5"), (1, float("inf"), "base_lr must be finite and >= 0, got inf")],
)
def test_bad_call_message(step, base, message):
    with pytest.raises(ValueError) as info:
        lr_at(step, base, ScheduleConfig(total_steps=10))
    assert str(info.value) == message


@pytest.mark.parametrize("kind", ["cosine", "linear"])
def test_min_lr_ratio_one_is_a_constant_after_warmup(kind):
    cfg = ScheduleConfig(kind=kind, warmup_steps=2, total_steps=6, min_lr_ratio=1.0)
    assert [lr_at(s, 2.0, cfg) for s in range(8)] == [0.0, 1.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0]


def test_zero_base_lr_is_allowed_and_gives_zero():
    cfg = ScheduleConfig(kind="cosine", warmup_steps=3, total_steps=9, min_lr_ratio=0.5)
    assert [lr_at(s, 0.0, cfg) for s in (0, 2, 3, 9, 20)] == [0.0] * 5
