"""Several adapters over one base: binding is real, swapping needs no re-installation, and a
compiled decoder layer neither bakes in nor ignores what is bound."""

import copy

import pytest
import torch
from peft import PeftModel

from tests.adapters.helpers import randomize, rel_err
from wmtp_fn.adapters import AdapterSpec, apply, export_peft, init


@pytest.fixture
def two_adapters(base):
    a, spec_a = init(base, AdapterSpec(rank=4, alpha=8.0, targets=("q_proj", "v_proj")), seed=0)
    b, spec_b = init(base, AdapterSpec(rank=8, alpha=32.0, use_rslora=True, use_dora=True), seed=1)
    return (randomize(a, seed=10), spec_a), (randomize(b, seed=11), spec_b)


def test_two_adapters_in_turn_match_two_separate_peft_models(base, plain, batch, two_adapters, tmp_path):
    (a, spec_a), (b, spec_b) = two_adapters
    export_peft(a, spec_a, tmp_path / "a")
    export_peft(b, spec_b, tmp_path / "b")
    peft_a = PeftModel.from_pretrained(copy.deepcopy(plain), tmp_path / "a").eval()
    peft_b = PeftModel.from_pretrained(copy.deepcopy(plain), tmp_path / "b").eval()
    with torch.no_grad():
        out_a = apply(base, a, spec_a, **batch).logits
        out_b = apply(base, b, spec_b, **batch).logits
        out_a2 = apply(base, a, spec_a, **batch).logits
        assert rel_err(out_a, peft_a(**batch).logits) <= 1e-5
        assert rel_err(out_b, peft_b(**batch).logits) <= 1e-5
    assert torch.equal(out_a, out_a2)  # b left nothing behind
    assert rel_err(out_a, out_b) > 1e-2
    assert base.model.layers[0].self_attn.q_proj.lora_A is None  # nothing stays bound


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_swapping_under_a_compiled_decoder_layer(base, batch, two_adapters, backend):
    (a, spec_a), _ = two_adapters
    # A second adapter with the same shapes as `a`: swapping it in must not recompile.
    c = randomize(a, seed=12)
    with torch.no_grad():
        eager = {name: apply(base, ad, spec_a, **batch).logits for name, ad in (("a", a), ("c", c))}
        eager["none"] = base(**batch).logits

    torch._dynamo.reset()
    base.model.layers[0].compile(backend=backend, fullgraph=True)
    with torch.no_grad():
        compiled = {"a": apply(base, a, spec_a, **batch).logits}
        with torch._dynamo.config.patch(error_on_recompile=True):
            compiled["c"] = apply(base, c, spec_a, **batch).logits
        compiled["none"] = base(**batch).logits
    torch._dynamo.reset()

    for name in eager:
        assert rel_err(compiled[name], eager[name]) <= 1e-6, name
    assert rel_err(compiled["a"], compiled["c"]) > 1e-2
    assert rel_err(compiled["a"], compiled["none"]) > 1e-2


def test_dropout_is_active_only_in_training(base, batch):
    adapter, spec = init(base, AdapterSpec(rank=4, alpha=8.0, dropout=0.5), seed=0)
    adapter = randomize(adapter, seed=3)
    with torch.no_grad():
        eval1 = apply(base, adapter, spec, **batch).logits
        eval2 = apply(base, adapter, spec, **batch).logits
        torch.manual_seed(0)
        train1 = apply(base, adapter, spec, train=True, **batch).logits
        torch.manual_seed(0)
        train2 = apply(base, adapter, spec, train=True, **batch).logits
        torch.manual_seed(1)
        train3 = apply(base, adapter, spec, train=True, **batch).logits
    assert torch.equal(eval1, eval2)
    assert torch.equal(train1, train2)  # randomness comes from the (seeded) global generator
    assert rel_err(train1, eval1) > 1e-3 and rel_err(train1, train3) > 1e-3


def test_dropout_statistics_in_bf16():
    """Drop rate and mean are those of the requested p, also in bf16 (drawn in fp32)."""
    from wmtp_fn.adapters.slots import lora_delta

    torch.manual_seed(0)
    x = torch.ones(4096, 64, dtype=torch.bfloat16)
    eye = torch.eye(64, dtype=torch.bfloat16)
    h = lora_delta(x, x, eye, None, eye, eye, dropout=torch.tensor(0.1))  # A = B = I: the delta is drop(x)
    dropped = (h == 0).float().mean().item()
    assert abs(dropped - 0.1) < 0.0012  # 2 sigma of 262k draws; bf16 sampling gives 0.1018
    assert abs(h.float().mean().item() - 1.0) < 0.002  # bf16 rescaling gives 0.9964
