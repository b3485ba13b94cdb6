"""Our adapters against real PEFT, in both directions, fp32 (tolerance 1e-5 relative)."""

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from tests.adapters.helpers import randomize, randomize_peft, rel_err
from wmtp_fn.adapters import AdapterSpec, apply, export_peft, import_peft, init

VARIANTS = {
    "lora": dict(),
    "rslora": dict(use_rslora=True),
    "dora": dict(use_dora=True),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_our_export_loaded_by_peft_gives_our_logits(variant, base, plain, batch, tmp_path):
    spec = AdapterSpec(rank=4, alpha=12.0, targets=("q_proj", "v_proj", "o_proj", "up_proj", "down_proj"), **VARIANTS[variant])
    adapter, spec = init(base, spec, seed=3)
    adapter = randomize(adapter, seed=11)
    export_peft(adapter, spec, tmp_path / "ours")

    peft_model = PeftModel.from_pretrained(plain, tmp_path / "ours").eval()
    with torch.no_grad():
        want = peft_model(**batch).logits
        got = apply(base, adapter, spec, **batch).logits
        unbound = base(**batch).logits
    assert rel_err(got, want) <= 1e-5
    assert rel_err(unbound, want) > 1e-3  # the adapter really changes the output


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_peft_save_pretrained_imported_by_us_gives_peft_logits(variant, base, plain, batch, tmp_path):
    cfg = LoraConfig(
        r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "gate_proj", "down_proj"],
        layers_to_transform=[1] if variant == "lora" else None, **VARIANTS[variant],
    )
    torch.manual_seed(5)
    peft_model = get_peft_model(plain, cfg)
    randomize_peft(peft_model)  # PEFT initialises B to zeros
    peft_model.save_pretrained(tmp_path / "peft")
    peft_model.eval()

    adapter, spec = import_peft(tmp_path / "peft", base)
    assert spec.rank == 8 and spec.alpha == 16 and spec.variant == variant
    with torch.no_grad():
        want = peft_model(**batch).logits
        got = apply(base, adapter, spec, **batch).logits
    assert rel_err(got, want) <= 1e-5
