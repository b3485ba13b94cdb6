"""Value heads: initialisation facts, the forward against torch.nn modules holding the same
weights, dropout, the spec round trip and the located errors."""

import pytest
import torch
from torch import nn

from wmtp_fn.errors import ConfigError
from wmtp_fn.models.value_head import (
    ValueHeadSpec,
    _dropout,
    check_value_head,
    init_value_head,
    value_head,
)

D = 32


def hidden(seed=0, dtype=torch.float32):
    return torch.randn(2, 5, D, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.mark.parametrize("kind,bias_init,expected", [
    ("linear", 0.0, 0.0), ("mlp", 0.0, 0.0), ("sigmoid", 0.0, 0.5),
    ("linear", 0.5, 0.5), ("mlp", 0.5, 0.5), ("sigmoid", 2.0, float(torch.sigmoid(torch.tensor(2.0)))),
])
def test_init_output_is_constant(kind, bias_init, expected):
    params = init_value_head(kind, D, bias_init=bias_init, seed=3)
    v = value_head(params, hidden(), kind=kind)
    assert v.shape == (2, 5) and v.dtype == torch.float32
    torch.testing.assert_close(v, torch.full((2, 5), expected), rtol=0, atol=1e-7)


def test_mlp_shapes_and_only_the_last_layer_zero():
    params = init_value_head("mlp", D, bias_init=0.5, seed=0)
    shapes = {".".join(k): tuple(v.shape) for k, v in params.items(include_nested=True, leaves_only=True)}
    assert shapes == {"fc1.weight": (8, 32), "fc1.bias": (8,), "fc2.weight": (4, 8), "fc2.bias": (4,),
                      "out.weight": (1, 4), "out.bias": (1,)}
    assert all(v.dtype == torch.float32 for v in params.values(include_nested=True, leaves_only=True))
    assert params["fc1", "weight"].abs().min() > 0 and params["fc2", "weight"].abs().min() > 0
    assert params["fc1", "weight"].abs().max() <= 1 / D**0.5  # Kaiming-uniform(a=√5) bound 1/√fan_in
    assert torch.equal(params["out", "weight"], torch.zeros(1, 4)) and params["out", "bias"].item() == 0.5
    # the zero last layer still gets a gradient (the hidden units differ), so the head can learn
    params["out", "weight"].requires_grad_(True)
    (g,) = torch.autograd.grad(value_head(params, hidden(), kind="mlp").sum(), params["out", "weight"])
    assert g.abs().min() > 0


def test_init_is_seeded():
    a, b, c = (init_value_head("mlp", D, seed=s) for s in (1, 1, 2))
    assert torch.equal(a["fc1", "weight"], b["fc1", "weight"])
    assert not torch.equal(a["fc1", "weight"], c["fc1", "weight"])


def torch_reference(kind, params, dropout=0.2):
    """The same head as torch.nn modules, weights copied in."""
    if kind == "mlp":
        mod = nn.Sequential(nn.Linear(D, D // 4), nn.GELU(), nn.Dropout(dropout), nn.Linear(D // 4, D // 8),
                            nn.GELU(), nn.Dropout(dropout), nn.Linear(D // 8, 1))
        names = {"fc1": "0", "fc2": "3", "out": "6"}
    else:
        mod = nn.Sequential(nn.Linear(D, 1))
        names = {"out": "0"}
    mod.load_state_dict({f"{names[k[0]]}.{k[1]}": v for k, v in params.items(include_nested=True, leaves_only=True)})
    return mod.eval()


@pytest.mark.parametrize("kind", ["linear", "sigmoid", "mlp"])
def test_forward_equals_torch_modules(kind):
    params = init_value_head(kind, D, seed=0)
    g = torch.Generator().manual_seed(1)
    params["out", "weight"].copy_(torch.randn(params["out", "weight"].shape, generator=g))
    params["out", "bias"].fill_(0.3)
    def reference(h):
        v = torch_reference(kind, params)(h.float()).squeeze(-1)
        return torch.sigmoid(v) if kind == "sigmoid" else v

    torch.testing.assert_close(value_head(params, hidden(), kind=kind), reference(hidden()))
    # bf16 hidden states: the head still computes in fp32
    v16 = value_head(params, hidden(dtype=torch.bfloat16), kind=kind)
    assert v16.dtype == torch.float32
    torch.testing.assert_close(v16, reference(hidden(dtype=torch.bfloat16)))


def test_dropout_only_in_training_and_reproducible_from_the_generator():
    params = init_value_head("mlp", D, seed=0)
    params["out", "weight"].fill_(1.0)
    h = hidden()
    eval_v = value_head(params, h, kind="mlp", train=False, dropout=0.5)
    a = value_head(params, h, kind="mlp", train=True, dropout=0.5, generator=torch.Generator().manual_seed(7))
    b = value_head(params, h, kind="mlp", train=True, dropout=0.5, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b) and not torch.allclose(a, eval_v)
    torch.testing.assert_close(value_head(params, h, kind="mlp", train=True, dropout=0.0), eval_v)


def test_dropout_keeps_the_expectation():
    """100 000 units: the dropped fraction is p ± 5·sqrt(p(1−p)/n) ≈ 0.0079 and kept units are
    scaled by exactly 1/(1 − p)."""
    x = torch.ones(100_000)
    y = _dropout(x, 0.5, torch.Generator().manual_seed(0))
    assert set(y.unique().tolist()) == {0.0, 2.0}
    assert abs((y == 0).float().mean().item() - 0.5) < 0.008


def test_spec_round_trip_and_errors():
    spec = ValueHeadSpec(kind="mlp", d=D, dropout=0.1, bias_init=0.5)
    d = spec.to_dict()
    assert d["type"] == "value_head" and ValueHeadSpec.from_dict(d) == spec
    with pytest.raises(ConfigError, match="type 'value_head'"):
        ValueHeadSpec.from_dict({"kind": "mlp", "d": D})
    with pytest.raises(ConfigError, match="unknown ValueHeadSpec field"):
        ValueHeadSpec.from_dict({**d, "width": 3})
    with pytest.raises(ConfigError, match="kind must be one of"):
        ValueHeadSpec(kind="tanh", d=D)
    with pytest.raises(ConfigError, match="d >= 8"):
        init_value_head("mlp", 4)


def test_check_value_head_names_the_bad_parameter():
    params = init_value_head("mlp", D)
    check_value_head(params, "mlp", D)
    with pytest.raises(ValueError, match="missing parameter 'fc1.bias'"):
        check_value_head(params.exclude(("fc1", "bias")), "mlp", D)
    with pytest.raises(ValueError, match="unexpected parameter 'fc1.bias'"):
        check_value_head(params, "linear", D)
    with pytest.raises(ValueError, match=r"'fc1.bias' has shape \(8,\), expected \(16,\)"):
        check_value_head(params, "mlp", 64)
