"""The Base record: the fingerprint is taken once, at load, and every adapter call reads it."""

import pytest

import wmtp_fn.adapters.lora as lora
from wmtp_fn.adapters import AdapterSpec, apply, init, validate
from wmtp_fn.errors import BaseModelError
from wmtp_fn.models.base import open_base
from wmtp_fn.models.prepare import prepare


def test_the_fingerprint_is_computed_once_per_load(tiny_dir, batch, monkeypatch):
    import wmtp_fn.models.base as base_mod

    calls = []
    real = base_mod.fingerprint

    def counting(model):
        calls.append(1)
        return real(model)

    monkeypatch.setattr(base_mod, "fingerprint", counting)
    monkeypatch.setattr(lora, "fingerprint", counting)
    base = prepare(open_base(tiny_dir), targets="all")
    assert len(calls) == 1 and base.kind == "causal_lm" and base.path == str(tiny_dir)
    adapter, spec = init(base, AdapterSpec(rank=2), seed=0)
    validate(adapter, spec, base)
    apply(base.module, adapter, spec, **batch)
    assert len(calls) == 1  # init and validate read the record
    assert spec.base_fingerprint == base.fingerprint
    init(base.module, AdapterSpec(rank=2), seed=0)  # a bare module: computed on demand
    assert len(calls) == 2


def test_open_base_refuses_another_architecture_before_loading(tmp_path, monkeypatch):
    import json

    from transformers import LlamaForCausalLM

    monkeypatch.setattr(LlamaForCausalLM, "from_pretrained", lambda *a, **k: pytest.fail("weights were loaded"))
    for model_type in ("gpt2", "bert"):
        d = tmp_path / model_type
        d.mkdir()
        (d / "config.json").write_text(json.dumps({"model_type": model_type}))
        with pytest.raises(BaseModelError, match=rf"base.path: .* is a {model_type} model; wmtp_fn supports Llama"):
            open_base(d)
    with pytest.raises(BaseModelError, match="is not a directory"):
        open_base(tmp_path / "missing")
