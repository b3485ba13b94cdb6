"""The NF4 (QLoRA) base: dequantisation against an independent unpacking, the forward against
dequantise-then-`F.linear`, the error against the full-precision weights, adapter gradients
against a float64 reference on the dequantised weights, and what is refused.

bitsandbytes' 4-bit kernels run on the CPU (0.50), so nothing here needs a GPU."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

pytest.importorskip("bitsandbytes")

from wmtp_fn.adapters import AdapterSpec, apply, export_merged, install_slots, merged_into  # noqa: E402
from wmtp_fn.adapters import init as init_adapter  # noqa: E402
from wmtp_fn.adapters.nf4 import (  # noqa: E402
    BLOCKSIZE,
    NF4_LEVELS,
    NF4_MAX_REL_ERROR,
    NF4Slot,
    absmax_of,
    check_quant_type,
    dequantize_nf4,
    quantize_linears,
    quantize_nf4,
    quantized_slots,
)
from wmtp_fn.adapters.slots import LoRASlot  # noqa: E402
from wmtp_fn.errors import ConfigError  # noqa: E402
from wmtp_fn.fingerprint import check_same_base, fingerprint  # noqa: E402
from wmtp_fn.models.base import Base, build_base, tiny_llama_config  # noqa: E402
from wmtp_fn.models.prepare import prepare  # noqa: E402

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def reference_dequantize(q: dict[str, torch.Tensor], shape) -> torch.Tensor:
    """NF4 unpacked by hand: two indices per byte (high nibble first), each a level of the
    paper's table times its 64-block absmax; the absmax is its 8-bit code's value times the
    256-block scale, plus the offset (double quantisation). In fp32, one rounding per product
    and sum, as the format defines it (so the kernels must agree to the bit)."""
    packed = q["packed"].reshape(-1).long()
    idx = torch.stack([packed >> 4, packed & 15], dim=1).reshape(-1)
    codes = q["absmax"].long()
    scale2 = q["absmax2"].float().repeat_interleave(256)[: codes.numel()]
    absmax = q["code2"].float()[codes] * scale2 + q["offset"].float()
    levels = torch.tensor(NF4_LEVELS, dtype=torch.float32)[idx]
    return (levels.reshape(-1, BLOCKSIZE) * absmax[:, None]).reshape(shape)


def weights(kind: str, shape=(96, 128), seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "gauss":
        return torch.randn(shape, generator=g) * 0.02
    if kind == "heavy":  # Student-t(2)-like tails: absmaxes spread over orders of magnitude
        return torch.randn(shape, generator=g) * 0.02 / torch.rand(shape, generator=g).clamp_min(1e-3).sqrt()
    if kind == "rows":  # rows of very different scales
        return torch.randn(shape, generator=g) * torch.logspace(-4, 0, shape[0])[:, None]
    raise ValueError(kind)


# ----------------------------------------------------------------------------- the format


@pytest.mark.parametrize("kind", ["gauss", "heavy", "rows"])
@pytest.mark.parametrize("shape", [(96, 128), (64, 176), (3, 64), (256, 384)])
def test_dequantisation_is_the_hand_unpacking_of_the_format(kind, shape):
    """(64, 176): rows that are not a whole number of blocks (bitsandbytes 0.50's CPU kernel gets
    those wrong when called with the 2-D shape; `dequantize_nf4` calls it flat). (256, 384):
    1536 absmaxes, six second-level blocks of 256."""
    w = weights(kind, shape)
    q = quantize_nf4(w)
    assert q["packed"].dtype == torch.uint8 and q["packed"].numel() == w.numel() // 2
    assert q["absmax"].dtype == torch.uint8 and q["absmax"].numel() == w.numel() // BLOCKSIZE
    ref = reference_dequantize(q, w.shape)
    assert torch.equal(dequantize_nf4(q, w.shape, torch.float32), ref)
    # every block holds a ±1 level; its 8-bit absmax may even come out negative when it is far below
    # the mean absmax of its 256 blocks (the "rows" weights): double quantisation's absolute error
    assert torch.equal(absmax_of(q).abs(), ref.reshape(-1, BLOCKSIZE).abs().amax(1))
    # The offset of the second level is the mean of the true absmaxes.
    true_absmax = w.reshape(-1, BLOCKSIZE).abs().amax(1)
    assert math.isclose(float(q["offset"]), float(true_absmax.mean()), rel_tol=1e-5)


@pytest.mark.parametrize("kind", ["gauss", "heavy", "rows"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_each_weight_is_within_half_the_widest_level_gap_of_its_block_absmax(kind, seed):
    """The documented bound (docs/qlora.md): |w − Ŵ| ≤ 0.152·a + |a − â| per element, with a
    the block's absmax and â its double-quantised value. Nearest-level rounding is what makes
    it hold: the 4-bit index is the level nearest to w / a."""
    w = weights(kind, seed=seed)
    q = quantize_nf4(w)
    a = w.reshape(-1, BLOCKSIZE).abs().amax(1, keepdim=True).double()
    a_hat = absmax_of(q).double()[:, None]
    err = (dequantize_nf4(q, w.shape, torch.float32).double() - w.double()).reshape(-1, BLOCKSIZE).abs()
    assert (err <= NF4_MAX_REL_ERROR * a + (a - a_hat).abs() + 1e-12).all()
    # nearest level: no other level is closer to w / a than the stored one (ties aside)
    levels = torch.tensor(NF4_LEVELS, dtype=torch.float64)
    x = (w.double().reshape(-1, BLOCKSIZE) / a).reshape(-1, 1)
    packed = q["packed"].reshape(-1).long()
    idx = torch.stack([packed >> 4, packed & 15], dim=1).reshape(-1)
    stored = (x[:, 0] - levels[idx]).abs()
    best = (x - levels).abs().min(1).values
    assert (stored <= best + 1e-6).all()


def test_the_nf4_constants():
    assert len(NF4_LEVELS) == 16 and NF4_LEVELS[0] == -1.0 and NF4_LEVELS[7] == 0.0 and NF4_LEVELS[15] == 1.0
    assert list(NF4_LEVELS) == sorted(NF4_LEVELS)
    assert math.isclose(NF4_MAX_REL_ERROR, (1.0 - 0.6961928009986877) / 2)  # the gap -1 .. -0.696


def test_a_bf16_weight_quantises_to_the_same_codes_as_its_fp32_values():
    w = weights("gauss").bfloat16()
    a, b = quantize_nf4(w), quantize_nf4(w.float())
    assert all(torch.equal(a[k], b[k]) for k in ("packed", "absmax", "absmax2", "offset"))
    assert dequantize_nf4(a, w.shape, torch.bfloat16).dtype == torch.bfloat16


def test_quantize_nf4_refuses_a_non_matrix():
    with pytest.raises(ValueError, match=r"quantize_nf4: expected a 2-D weight \[out, in\], got shape \(8,\)"):
        quantize_nf4(torch.ones(8))


# ----------------------------------------------------------------------------- the slot


def linear(out=96, inp=128, bias=False, seed=0) -> nn.Linear:
    lin = nn.Linear(inp, out, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(weights("gauss", (out, inp), seed))
        if bias:
            lin.bias.copy_(torch.randn(out) * 0.1)
    return lin.requires_grad_(False)


@pytest.mark.parametrize("bias", [False, True])
def test_an_unbound_nf4_slot_is_dequantise_then_f_linear_exactly(bias):
    lin = linear(bias=bias)
    slot = NF4Slot(lin)
    x = torch.randn(3, 5, 128)
    w_hat = reference_dequantize(slot.quant_state(), lin.weight.shape)
    assert torch.equal(slot(x), F.linear(x, w_hat, lin.bias))
    assert torch.equal(slot.dense_weight(), w_hat)
    assert slot.compute_dtype == torch.float32 and slot.weight_shape == (96, 128)
    assert "quant=nf4" in repr(slot) and not hasattr(slot, "weight")


def test_the_4bit_tensors_move_with_the_module_and_stay_out_of_the_state_dict():
    model = nn.Sequential()
    model.q_proj = NF4Slot(linear(bias=True))
    assert set(model.state_dict()) == {"q_proj.bias"}
    assert {n for n, _ in model.named_buffers()} >= {"q_proj.weight_packed", "q_proj.weight_absmax"}
    moved = model.to("meta")
    assert moved.q_proj.weight_packed.device.type == "meta"


def dense_twin(model: nn.Module) -> nn.Module:
    """A copy of a quantised model whose NF4 slots are dense slots holding the hand-dequantised
    weights: what the NF4 model must compute, in any dtype."""
    twin = copy.deepcopy(model)
    for path, slot in list(twin.named_modules()):
        if isinstance(slot, NF4Slot):
            lin = nn.Linear(slot.in_features, slot.out_features, bias=slot.bias is not None)
            lin.weight = nn.Parameter(reference_dequantize(slot.quant_state(), slot.weight_shape),
                                      requires_grad=False)
            lin.bias = slot.bias
            parent, _, leaf = path.rpartition(".")
            setattr(twin.get_submodule(parent), leaf, LoRASlot(lin))
    return twin


def nf4_llama(**cfg):
    """(NF4 base record, the dense module it was quantised from), both slotted."""
    module = build_base(tiny_llama_config(vocab_size=128, **cfg), seed=0)
    dense = copy.deepcopy(module)
    install_slots(dense)
    return prepare(Base.of(module, "causal_lm"), quantize="nf4"), dense


def nudged(adapter, seed=1):
    g = torch.Generator().manual_seed(seed)
    return adapter.apply(lambda t: t + 0.05 * torch.randn(t.shape, generator=g))


SPECS = {
    "lora": AdapterSpec(rank=4, alpha=8.0, targets=TARGETS),
    "rslora": AdapterSpec(rank=4, alpha=8.0, targets=TARGETS, use_rslora=True),
    "dora": AdapterSpec(rank=4, alpha=8.0, targets=TARGETS, use_dora=True),
    "dora-dropout": AdapterSpec(rank=4, alpha=8.0, targets=TARGETS, use_dora=True, dropout=0.2),
    "lora-subset": AdapterSpec(rank=2, alpha=2.0, targets=("v_proj", "down_proj"), layers=(1,)),
}


@pytest.mark.parametrize("name", sorted(SPECS))
def test_a_bound_nf4_model_computes_exactly_what_the_dense_dequantised_model_does(name):
    base, _ = nf4_llama()
    model = base.module
    twin = dense_twin(model)
    adapter, spec = init_adapter(base, SPECS[name], seed=0)
    adapter = nudged(adapter)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(3))
    outs = []
    for m in (model, twin):
        torch.manual_seed(7)  # the same dropout masks
        outs.append(apply(m, adapter, spec, ids, train=True).logits)
    assert torch.equal(outs[0], outs[1])


def test_dora_starts_from_the_row_norms_of_the_dequantised_weights():
    base, dense = nf4_llama()
    model = base.module
    adapter, _ = init_adapter(base, SPECS["dora"], seed=0)
    slot = model.model.layers[0].mlp.down_proj
    want = reference_dequantize(slot.quant_state(), slot.weight_shape).double().norm(dim=1).float()
    got = adapter["model", "layers", "0", "mlp", "down_proj", "lora_magnitude"]
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    dense_norm = dense.model.layers[0].mlp.down_proj.weight.norm(dim=1)
    assert not torch.allclose(got, dense_norm, rtol=1e-4)  # it is the 4-bit weight's norm, not the original's


@pytest.mark.parametrize("name", ["lora", "rslora", "dora"])
def test_adapter_gradients_match_a_float64_reference_on_the_dequantised_weights(name):
    base, _ = nf4_llama()
    model = base.module
    twin = dense_twin(model).double()
    adapter, spec = init_adapter(base, SPECS[name], seed=0)
    adapter = nudged(adapter)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(3))

    def grads(m, dtype):
        a = adapter.apply(lambda t: t.to(dtype).detach().requires_grad_(True))
        logits = apply(m, a, spec, ids).logits
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        return float(loss.detach()), {k: t.grad for k, t in a.items(True, True)}

    loss, got = grads(model, torch.float32)
    ref_loss, ref = grads(twin, torch.float64)
    assert math.isclose(loss, ref_loss, rel_tol=1e-6)
    for k, g in ref.items():
        err = float((got[k].double() - g).norm() / g.norm())
        assert err < 1e-5, (k, err)


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_a_biased_nf4_slot_with_dora_is_the_dense_slot_over_the_dequantised_weight(dropout):
    """DoRA with dropout recomputes the bias-free base output on the dropped-out input."""
    lin = linear(bias=True)
    slot = NF4Slot(lin)
    dense_lin = nn.Linear(128, 96)
    dense_lin.weight = nn.Parameter(reference_dequantize(slot.quant_state(), (96, 128)), requires_grad=False)
    dense_lin.bias = lin.bias
    dense = LoRASlot(dense_lin)
    g = torch.Generator().manual_seed(0)
    binding = {"lora_A": torch.randn(4, 128, generator=g) * 0.1, "lora_B": torch.randn(96, 4, generator=g) * 0.1,
               "lora_magnitude": dense_lin.weight.norm(dim=1) * 1.1}
    if dropout:
        binding["lora_dropout"] = torch.tensor(dropout)
    x = torch.randn(3, 128, generator=g)
    outs = []
    for s in (slot, dense):
        torch.manual_seed(1)
        outs.append(torch.func.functional_call(s, binding, (x,), strict=False))
    assert torch.equal(outs[0], outs[1])


def test_a_frozen_input_puts_no_backward_through_the_4bit_base(monkeypatch):
    """The adapter's gradient does not pass through the base linear when x needs none (the first
    layer's projections): one dequantisation, in the forward only."""
    import wmtp_fn.adapters.nf4 as nf4

    slot = NF4Slot(linear())
    calls = []
    real = nf4.dequantize_nf4
    monkeypatch.setattr(nf4, "dequantize_nf4", lambda *a: calls.append(1) or real(*a))
    lora_a = torch.randn(4, 128, requires_grad=True)
    x = torch.randn(3, 128)  # a frozen input: only the adapter needs a gradient
    y = torch.func.functional_call(slot, {"lora_A": lora_a, "lora_B": torch.ones(96, 4)}, (x,), strict=False)
    assert len(calls) == 1
    y.sum().backward()
    assert len(calls) == 1 and lora_a.grad is not None


def test_without_bitsandbytes_quantising_says_what_to_install(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "bitsandbytes.functional", None)
    with pytest.raises(ImportError, match=r"^base.quantize='nf4' needs bitsandbytes: pip install 'wmtp_fn\[quant\]' "
                                          r"\(bitsandbytes>=0.50.2,<0.51\)$"):
        quantize_nf4(torch.ones(4, 64))


def test_the_nf4_backward_into_the_input_holds_no_dense_weight():
    """Only the 4-bit tensors (and the input) are saved for the backward, never a dense Ŵ."""
    slot = NF4Slot(linear(out=256, inp=256))
    x = torch.randn(4, 256, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = slot(x)
    assert all(t.numel() < 256 * 256 for t in saved), [tuple(t.shape) for t in saved]
    y.square().sum().backward()
    w_hat = slot.dense_weight()
    torch.testing.assert_close(x.grad, (2 * y.detach()) @ w_hat, rtol=1e-6, atol=1e-6)


def test_a_bound_dora_slot_with_dropout_holds_no_dense_weight_for_the_backward_either():
    """DoRA with dropout needs the base output of the dropped-out input: the slot passes its own
    4-bit base path, so no dense Ŵ is saved (its row norm is taken without grad)."""
    slot = NF4Slot(linear(out=256, inp=256))
    g = torch.Generator().manual_seed(0)
    slot._buffers.update(lora_A=0.1 * torch.randn(4, 256, generator=g), lora_B=0.1 * torch.randn(256, 4, generator=g),
                         lora_magnitude=1.0 + torch.rand(256, generator=g), lora_dropout=torch.tensor(0.1))
    x = torch.randn(4, 256, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = slot(x)
    assert saved and all(t.numel() < 256 * 256 for t in saved), [tuple(t.shape) for t in saved]
    y.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_nf4_logits_are_within_the_documented_error_of_the_full_precision_base():
    """docs/qlora.md: on this tiny random Llama the logits move by ~12% (relative norm); each
    weight by ~9% (relative RMS, Gaussian weights); bounded here with a margin."""
    base, dense = nf4_llama()
    model = base.module
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(3))
    q, d = model(ids).logits, dense(ids).logits
    rel = float((q - d).norm() / d.norm())
    assert 0.01 < rel < 0.2, rel
    w = dense.model.layers[0].self_attn.q_proj.weight
    w_hat = model.model.layers[0].self_attn.q_proj.dense_weight()
    assert 0.05 < float((w_hat - w).norm() / w.norm()) < 0.12


# ----------------------------------------------------------------------------- the base


def test_prepare_quantises_every_layer_linear_and_keeps_the_full_precision_fingerprint():
    module = build_base(tiny_llama_config(vocab_size=128), seed=0)
    dense_fp = fingerprint(module)
    base = prepare(Base(module, "causal_lm", dense_fp), targets=("q_proj",), quantize="nf4")
    assert len(quantized_slots(module)) == 2 * 7  # all seven linears of both layers, not only the targets
    assert type(module.lm_head) is nn.Linear and type(module.model.embed_tokens) is nn.Embedding
    assert base.fingerprint == {**dense_fp, "quant": "nf4"}
    check_same_base(dense_fp, base.fingerprint)  # an NF4-trained adapter fits the dense base and back
    check_same_base(base.fingerprint, dense_fp)
    with pytest.raises(ValueError, match=r"fingerprint: LlamaForCausalLM is already quantised \('model.layers.0"):
        fingerprint(module)


def test_an_nf4_base_is_not_fsdp_sharded_but_may_be_replicated():
    from wmtp_fn.errors import ConfigError

    module = build_base(tiny_llama_config(vocab_size=128), seed=0)
    with pytest.raises(ConfigError, match=r"base.quantize='nf4' cannot be combined with dist.shard='full'"):
        prepare(Base.of(module, "causal_lm"), quantize="nf4", shard="full")
    assert not quantized_slots(module)  # refused before anything was changed
    prepare(Base.of(module, "causal_lm"), quantize="nf4", shard="replicate")
    assert len(quantized_slots(module)) == 2 * 7


def test_prepare_without_quantize_leaves_the_base_dense():
    module = build_base(tiny_llama_config(vocab_size=128), seed=0)
    base = Base.of(module, "causal_lm")
    assert prepare(base, quantize="") is base
    assert not quantized_slots(module)


def test_quantising_an_already_slotted_base_and_twice():
    module = build_base(tiny_llama_config(vocab_size=128), seed=0)
    install_slots(module, ("q_proj",))
    want = [p for p, m in module.named_modules() if p.rpartition(".")[2] in TARGETS]
    assert list(quantize_linears(module)) == want and len(want) == 14
    assert quantize_linears(module) == ()  # idempotent
    assert quantized_slots(module) == want


class OwnLinear(nn.Linear):
    """A linear of another type (a subclass): not ours to quantise, as install_slots leaves it."""


def test_only_plain_linears_and_dense_slots_are_quantised_and_at_the_root_too():
    model = nn.Module()
    model.q_proj, model.k_proj, model.v_proj = nn.Linear(64, 64), OwnLinear(64, 64), nn.Linear(64, 64)
    model.o_proj = nn.Linear(64, 64)
    assert quantize_linears(model, targets=("q_proj", "k_proj", "o_proj")) == ("q_proj", "o_proj")
    assert isinstance(model.q_proj, NF4Slot) and type(model.k_proj) is OwnLinear and type(model.v_proj) is nn.Linear
    with pytest.raises(ValueError, match=r"quantize_linears: 'int8' is not one of \['nf4'\]"):
        quantize_linears(model, quantize="int8")
    with pytest.raises(ValueError, match=r"no linear named \['q_proj'\] to quantise in Linear"):
        quantize_linears(nn.Linear(4, 4), targets=("q_proj",))


def test_check_quant_type():
    assert check_quant_type("") == "" and check_quant_type("nf4") == "nf4"
    with pytest.raises(ConfigError, match=r"base.quantize: 'fp4' is not a quantisation; expected '' \(none\) or one of \['nf4'\]"):
        check_quant_type("fp4")
    with pytest.raises(ConfigError, match=r"^q: 'x'"):
        check_quant_type("x", key="q")


def test_merging_is_refused_on_an_nf4_base_with_what_to_do_instead(tmp_path):
    base, _ = nf4_llama()
    model = base.module
    adapter, spec = init_adapter(base, SPECS["lora"], seed=0)
    msg = r"the base is NF4-quantised \(14 slots, e.g. 'model.layers.0.self_attn.q_proj'\); merge into the full-precision"
    with pytest.raises(ValueError, match="export_merged: " + msg):
        export_merged(model, adapter, spec, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()
    with pytest.raises(ValueError, match="merged_into: " + msg):
        with merged_into(model, adapter, spec):
            pass


@pytest.mark.slow
def test_compiled_nf4_layers_match_eager_ones_with_checkpointing():
    """The GPU path: `compile_layers(fullgraph=True)` over NF4 slots (bitsandbytes' ops are
    registered custom ops with fake kernels), under activation checkpointing."""
    from wmtp_fn.models.layers import checkpoint_layers, compile_layers

    base, _ = nf4_llama(num_hidden_layers=1)
    eager = copy.deepcopy(base.module)
    checkpoint_layers(base.module)
    compile_layers(base.module, fullgraph=True)
    adapter, spec = init_adapter(base, SPECS["dora"], seed=0)
    adapter = nudged(adapter)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(3))

    def run(m):
        a = adapter.apply(lambda t: t.detach().requires_grad_(True))
        loss = apply(m, a, spec, ids).logits.square().mean()
        loss.backward()
        return loss.detach(), {k: t.grad for k, t in a.items(True, True)}

    (l1, g1), (l2, g2) = run(base.module), run(eager)
    torch.testing.assert_close(l1, l2, rtol=1e-5, atol=0)
    for k in g2:
        torch.testing.assert_close(g1[k], g2[k], rtol=1e-4, atol=1e-7)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_the_codes_are_the_cpu_ones_and_the_slot_is_dequantise_then_f_linear():
    """bitsandbytes' CUDA kernels: the same 4-bit codes as on the CPU (ties aside), the hand
    dequantisation up to the bf16 rounding, the forward `F.linear(x, Ŵ)` and the input
    gradient `g Ŵ` exactly."""
    w = weights("gauss", (512, 768)).bfloat16()
    q_cpu, q_gpu = quantize_nf4(w), quantize_nf4(w.cuda())
    for key in ("packed", "absmax"):
        same = (q_cpu[key] == q_gpu[key].cpu()).float().mean()
        assert same > 0.999, (key, same)
    lin = nn.Linear(768, 512, bias=False, device="cuda", dtype=torch.bfloat16).requires_grad_(False)
    with torch.no_grad():
        lin.weight.copy_(w.cuda())
    slot = NF4Slot(lin)
    w_hat = slot.dense_weight()
    ref = reference_dequantize({k: v.cpu() for k, v in slot.quant_state().items()}, (512, 768))
    torch.testing.assert_close(w_hat.float().cpu(), ref, rtol=2**-8, atol=0)
    x = torch.randn(4, 768, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    y = slot(x)
    assert torch.equal(y, F.linear(x.detach(), w_hat))
    y.float().square().sum().backward()
    assert torch.equal(x.grad, (2 * y.detach().float()).bfloat16() @ w_hat)
