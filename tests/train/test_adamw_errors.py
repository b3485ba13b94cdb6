"""AdamW's argument errors, each with its exact message, and the boundaries they guard: the
accepted edge values (lr 0, beta 0, wd 0, max_grad_norm 0 / None) really work."""

import math

import pytest
import torch
from tensordict import TensorDict

from wmtp_fn.train import adamw


def params(**leaves):
    return TensorDict(leaves or {"w": torch.ones(3)}, batch_size=[])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(lr=-1.0), "AdamWConfig.lr must be >= 0, got -1.0"),
        (dict(lr=math.nan), "AdamWConfig.lr must be >= 0, got nan"),
        (dict(betas=(0.9,)), "AdamWConfig.betas must be two numbers in [0, 1), got (0.9,)"),
        (dict(betas=(1.0, 0.999)), "AdamWConfig.betas must be two numbers in [0, 1), got (1.0, 0.999)"),
        (dict(betas=(0.9, -0.1)), "AdamWConfig.betas must be two numbers in [0, 1), got (0.9, -0.1)"),
        (dict(eps=0.0), "AdamWConfig.eps must be > 0, got 0.0"),
        (dict(weight_decay=-0.1), "AdamWConfig.weight_decay must be >= 0, got -0.1"),
        (dict(lr_multipliers={"lora_B": 0.0}), "AdamWConfig.lr_multipliers needs str -> float > 0, got 'lora_B': 0.0"),
        (dict(lr_multipliers={3: 2.0}), "AdamWConfig.lr_multipliers needs str -> float > 0, got 3: 2.0"),
        (dict(no_decay="bias"), "AdamWConfig.no_decay must be a tuple of str, got 'bias'"),
        (dict(no_decay=("bias", 1)), "AdamWConfig.no_decay must be a tuple of str, got ('bias', 1)"),
        (dict(max_grad_norm=-1.0), "AdamWConfig.max_grad_norm must be None or >= 0, got -1.0"),
        (dict(impl="cuda"), "AdamWConfig.impl must be one of ('auto', 'fused', 'foreach'), got 'cuda'"),
    ],
)
def test_bad_config_message(kwargs, message):
    with pytest.raises(ValueError) as info:
        adamw.AdamWConfig(**kwargs)
    assert str(info.value) == message


@pytest.mark.parametrize("lr", [-1e-3, math.inf, math.nan])
def test_update_rejects_a_bad_learning_rate(lr):
    p = params()
    state = adamw.init(p, adamw.AdamWConfig())
    with pytest.raises(ValueError) as info:
        adamw.update(params(w=torch.ones(3)), state, p, lr=lr, cfg=adamw.AdamWConfig())
    assert str(info.value) == f"AdamW.update: lr must be finite and >= 0, got {lr!r}"


def test_update_rejects_a_gradient_of_another_shape():
    p = params(a=torch.ones(2, 3), b=torch.ones(4))
    cfg = adamw.AdamWConfig()
    state = adamw.init(p, cfg)
    grads = params(a=torch.ones(2, 3), b=torch.ones(5))
    with pytest.raises(ValueError) as info:
        adamw.update(grads, state, p, lr=1e-3, cfg=cfg)
    assert str(info.value) == "AdamW.update: grad of 'b' has shape (5,), param (4,)"


def test_init_errors():
    with pytest.raises(ValueError) as info:
        adamw.init(TensorDict({}, batch_size=[]), adamw.AdamWConfig())
    assert str(info.value) == "AdamW.init: params has no leaves"
    with pytest.raises(TypeError) as info:
        adamw.init(params(n=torch.zeros(2, dtype=torch.int64)), adamw.AdamWConfig())
    assert str(info.value) == "AdamW.init: leaf 'n' has non-float dtype torch.int64"
    with pytest.raises(ValueError) as info:
        adamw.init(params(w=torch.zeros(2, device="meta")), adamw.AdamWConfig(impl="fused"))
    assert str(info.value) == "AdamW impl='fused' has no kernel for meta/torch.float32"
    with pytest.raises(ValueError) as info:
        adamw.init(params(x=torch.zeros(2)), adamw.AdamWConfig(lr_multipliers={"x": 2.0, "*": 3.0}))
    assert str(info.value) == "leaf 'x' matches lr_multipliers with different values [2.0, 3.0]"


@pytest.mark.parametrize("impl", ["fused", "foreach"])
def test_edge_values_are_accepted_and_mean_what_they_say(impl):
    """lr = 0 leaves params unchanged; β1 = 0 makes m the last gradient; max_grad_norm = 0 and None
    both mean no clipping (a large gradient keeps its norm)."""
    g = torch.tensor([3.0, -4.0])  # norm 5
    for clip in (0.0, None):
        cfg = adamw.AdamWConfig(lr=0.0, betas=(0.0, 0.5), weight_decay=0.0, max_grad_norm=clip, impl=impl)
        p = params(w=torch.tensor([1.0, 2.0]))
        state = adamw.init(p, cfg)
        grads = params(w=g.clone())
        p, state, stats = adamw.update(grads, state, p, lr=0.0, cfg=cfg)
        assert torch.equal(p["w"], torch.tensor([1.0, 2.0]))
        assert torch.equal(state["mu"]["w"], g)  # m = (1 − β1)·g with β1 = 0
        assert torch.allclose(state["nu"]["w"], 0.5 * g * g)
        assert float(stats["grad_norm"]) == 5.0 and torch.equal(grads["w"], g)
