"""PEFT QLoRA interoperability: an adapter trained on our NF4 base loads in PEFT over a
bitsandbytes-quantised model (`BitsAndBytesConfig` NF4 + double quantisation, the seeds'
setting) and gives our logits; a PEFT QLoRA adapter imported by us gives PEFT's. Both bases
are quantised by bitsandbytes from the same weights, so they hold the same 4-bit codes.

fp32 compute on the CPU. The tiny model's widths are multiples of 64 (as every real Llama's):
PEFT computes through bitsandbytes' 2-D CPU dequantisation, which is wrong for rows that are
not a whole number of 64-blocks (adapters.nf4.dequantize_nf4 says why ours is not). On a CPU
with AVX512-BF16, bitsandbytes' *inference* forward (eval, no grad) repacks the weights for a
bf16 kernel (~3e-3 relative error); the PEFT base here is held to its training path, which
dequantises and multiplies as ours does (and as the CUDA kernels always do for a batch)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("bitsandbytes")

from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training  # noqa: E402
from transformers import BitsAndBytesConfig, LlamaForCausalLM  # noqa: E402

from tests.adapters.helpers import randomize, randomize_peft, rel_err  # noqa: E402
from wmtp_fn.adapters import AdapterSpec, apply, export_peft, import_peft, init  # noqa: E402
from wmtp_fn.models.base import build_base, open_base, tiny_llama_config  # noqa: E402
from wmtp_fn.models.prepare import prepare  # noqa: E402

VARIANTS = {"lora": dict(), "rslora": dict(use_rslora=True), "dora": dict(use_dora=True)}
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("nf4_base")
    build_base(tiny_llama_config(vocab_size=256, intermediate_size=192), seed=0).save_pretrained(path)
    return path


def ours(base_dir):
    return prepare(open_base(base_dir), quantize="nf4")


def peft_base(base_dir):
    """The seeds' QLoRA base: transformers + bitsandbytes NF4, double quantisation, then
    `prepare_model_for_kbit_training` (fp32 compute on the CPU)."""
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.float32)
    model = LlamaForCausalLM.from_pretrained(str(base_dir), quantization_config=quant, dtype=torch.float32,
                                             device_map="cpu", attn_implementation="sdpa")
    import bitsandbytes as bnb

    for m in model.modules():  # bitsandbytes' exact path (dequantise, then matmul: what it trains with)
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


def batch():
    ids = torch.randint(4, 256, (2, 12), generator=torch.Generator().manual_seed(7))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def test_the_two_nf4_bases_compute_the_same_logits(base_dir):
    with torch.no_grad():
        got = ours(base_dir).module(**batch()).logits
        want = peft_base(base_dir)(**batch()).logits
    assert rel_err(got, want) <= 1e-6


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_an_adapter_trained_on_our_nf4_base_loads_in_peft_qlora_with_our_logits(variant, base_dir, tmp_path):
    base = ours(base_dir)
    adapter, spec = init(base, AdapterSpec(rank=4, alpha=12.0, targets=TARGETS, **VARIANTS[variant]), seed=3)
    adapter = randomize(adapter, seed=11)
    export_peft(adapter, spec, tmp_path / "ours")
    peft_model = PeftModel.from_pretrained(peft_base(base_dir), tmp_path / "ours").eval()
    with torch.no_grad():
        want = peft_model(**batch()).logits
        got = apply(base.module, adapter, spec, **batch()).logits
        unbound = base.module(**batch()).logits
    assert rel_err(got, want) <= 1e-5
    assert rel_err(unbound, want) > 1e-3  # the adapter really changes the output


@pytest.mark.parametrize("variant", ["lora", "dora"])
def test_a_peft_qlora_adapter_imported_onto_our_nf4_base_gives_peft_logits(variant, base_dir, tmp_path):
    torch.manual_seed(5)
    peft_model = get_peft_model(peft_base(base_dir), LoraConfig(r=8, lora_alpha=16, target_modules=list(TARGETS),
                                                                **VARIANTS[variant]))
    randomize_peft(peft_model)  # PEFT initialises B to zeros
    peft_model.save_pretrained(tmp_path / "peft")
    peft_model.eval()
    base = ours(base_dir)
    adapter, spec = import_peft(tmp_path / "peft", base)
    assert spec.base_fingerprint["quant"] == "nf4"
    with torch.no_grad():
        want = peft_model(**batch()).logits
        got = apply(base.module, adapter, spec, **batch()).logits
    assert rel_err(got, want) <= 1e-5
