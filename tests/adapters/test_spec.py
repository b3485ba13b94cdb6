"""AdapterSpec and target names by hand: canonical order, Meta aliases, normalisation, scaling,
the JSON round trip, and each validation message exactly."""

import json

import pytest

from wmtp_fn.adapters import AdapterSpec, resolve_targets

ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.mark.parametrize(
    "names, want",
    [
        ("all", ALL),
        (["all"], ALL),
        ("v_proj", ("v_proj",)),
        (["down_proj", "q_proj", "q_proj"], ("q_proj", "down_proj")),  # canonical order, no repeats
        (["w2", "wq", "wk", "wv", "wo", "w1", "w3"], ALL),  # Meta's names
        (("w3", "up_proj"), ("up_proj",)),  # an alias and its canonical name are one target
    ],
)
def test_resolve_targets(names, want):
    assert resolve_targets(names) == want


def test_resolve_targets_errors():
    with pytest.raises(ValueError) as info:
        resolve_targets(["q_proj", "qkv"])
    assert str(info.value) == (
        "unknown LoRA target 'qkv'; valid names are q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, "
        "down_proj (or Meta aliases wq, wk, wv, wo, w1, w3, w2, or 'all')"
    )
    with pytest.raises(ValueError) as info:
        resolve_targets([])
    assert str(info.value) == (
        "LoRA targets are empty; name at least one of q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj"
    )


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(rank=0), "AdapterSpec.rank must be a positive int, got 0"),
        (dict(rank=2.0), "AdapterSpec.rank must be a positive int, got 2.0"),
        (dict(alpha=0.0), "AdapterSpec.alpha must be a positive number, got 0.0"),
        (dict(alpha="8"), "AdapterSpec.alpha must be a positive number, got '8'"),
        (dict(dropout=1.0), "AdapterSpec.dropout must be in [0, 1), got 1.0"),
        (dict(dropout=-0.1), "AdapterSpec.dropout must be in [0, 1), got -0.1"),
    ],
)
def test_bad_spec_message(kwargs, message):
    with pytest.raises(ValueError) as info:
        AdapterSpec(**kwargs)
    assert str(info.value) == message


def test_edge_values_are_valid():
    spec = AdapterSpec(rank=1, alpha=1e-3, dropout=0.0)
    assert (spec.rank, spec.alpha, spec.dropout) == (1, 1e-3, 0.0)
    assert AdapterSpec(dropout=0.999).dropout == 0.999
    assert AdapterSpec(alpha=3).alpha == 3  # an int alpha is a number too


@pytest.mark.parametrize(
    "kwargs, scaling, variant",
    [
        (dict(rank=8, alpha=16.0), 2.0, "lora"),
        (dict(rank=16, alpha=8.0, use_rslora=True), 2.0, "rslora"),  # 8 / √16
        (dict(rank=4, alpha=6.0, use_dora=True), 1.5, "dora"),
        (dict(rank=9, alpha=6.0, use_rslora=True, use_dora=True), 2.0, "rsdora"),  # 6 / √9
    ],
)
def test_scaling_and_variant_by_hand(kwargs, scaling, variant):
    spec = AdapterSpec(**kwargs)
    assert spec.scaling == scaling and spec.variant == variant


def test_normalisation_of_targets_layers_and_fingerprint():
    fp = {"arch": "a", "weights": "w"}
    spec = AdapterSpec(targets=["wv", "q_proj"], layers=[3, 1, 3], base_fingerprint=fp)
    assert spec.targets == ("q_proj", "v_proj")
    assert spec.layers == (1, 3)
    assert spec.base_fingerprint == fp and spec.base_fingerprint is not fp  # a copy, not the caller's dict
    assert AdapterSpec(layers=None).layers is None
    assert AdapterSpec().targets == ALL and AdapterSpec().rank == 16 and AdapterSpec().alpha == 32.0


def test_json_round_trip_and_replace():
    spec = AdapterSpec(rank=4, alpha=8.0, dropout=0.1, targets=("k_proj", "up_proj"), layers=(0, 2),
                       use_rslora=True, use_dora=True, base_fingerprint={"weights": "abc"})
    d = json.loads(json.dumps(spec.to_dict()))
    assert d == {"rank": 4, "alpha": 8.0, "dropout": 0.1, "targets": ["k_proj", "up_proj"], "layers": [0, 2],
                 "use_rslora": True, "use_dora": True, "base_fingerprint": {"weights": "abc"}}
    assert AdapterSpec.from_dict(d) == spec
    plain = AdapterSpec(rank=2)
    assert plain.to_dict()["layers"] is None and AdapterSpec.from_dict(plain.to_dict()) == plain
    assert AdapterSpec.from_dict({"rank": 2}) == AdapterSpec(rank=2)  # absent fields take their defaults
    changed = spec.replace(rank=8)
    assert changed.rank == 8 and spec.rank == 4 and changed.targets == spec.targets


def test_from_dict_rejects_unknown_fields_by_name():
    with pytest.raises(ValueError) as info:
        AdapterSpec.from_dict({"rank": 4, "ranks": 4, "lora_alpha": 8})
    assert str(info.value) == (
        "unknown AdapterSpec field(s) ['lora_alpha', 'ranks']; expected a subset of ['alpha', 'base_fingerprint', "
        "'dropout', 'layers', 'rank', 'targets', 'use_dora', 'use_rslora']"
    )
