import pytest
import torch

from tests.adapters.helpers import randomize, rel_err
from wmtp_fn.adapters import AdapterSpec, apply, init, install_slots, to_flat
from wmtp_fn.models.base import load_base
from wmtp_fn.models.layers import checkpoint_layers, compile_layers


def grads(model, adapter, spec, batch, seed=0):
    leaves = adapter.apply(lambda t: t.detach().requires_grad_())
    torch.manual_seed(seed)
    logits = apply(model, leaves, spec, train=True, **batch).logits
    (logits.float().square().mean()).backward()
    return logits.detach(), {k: v.grad for k, v in to_flat(leaves).items()}


@pytest.mark.parametrize("kw", [dict(), dict(use_dora=True), dict(dropout=0.3)])
def test_checkpointed_layers_give_the_same_gradients(tiny_dir, batch, kw):
    plain = load_base(tiny_dir)
    install_slots(plain)
    ckpt = load_base(tiny_dir)
    install_slots(ckpt)
    checkpoint_layers(ckpt)
    adapter, spec = init(plain, AdapterSpec(rank=4, alpha=8.0, **kw), seed=0)
    adapter = randomize(adapter, seed=1)

    out_ref, g_ref = grads(plain, adapter, spec, batch)
    out, g = grads(ckpt, adapter, spec, batch)
    assert torch.equal(out, out_ref)
    for k in g_ref:
        assert g[k] is not None and rel_err(g[k], g_ref[k]) <= 1e-6, k
    assert ckpt.model.layers[0].self_attn.q_proj.lora_A is None  # nothing left bound


def test_checkpointing_keeps_names_and_no_grad_path(base, batch):
    names = list(base.state_dict())
    checkpoint_layers(base)
    checkpoint_layers(base)  # idempotent
    assert list(base.state_dict()) == names
    adapter, spec = init(base, AdapterSpec(rank=2), seed=0)
    with torch.no_grad():
        apply(base, adapter, spec, **batch)


def assert_trains_like_eager(tiny_dir, batch, configure, **spec_kw):
    """Output and adapter gradients of a base prepared by `configure` equal the plain base's."""
    eager = load_base(tiny_dir)
    install_slots(eager)
    other = load_base(tiny_dir)
    install_slots(other)
    configure(other)
    adapter, spec = init(eager, AdapterSpec(rank=4, alpha=8.0, **spec_kw), seed=0)
    adapter = randomize(adapter, seed=1)
    torch._dynamo.reset()
    out_ref, g_ref = grads(eager, adapter, spec, batch)
    out, g = grads(other, adapter, spec, batch)
    torch._dynamo.reset()
    assert rel_err(out, out_ref) <= 1e-6
    for k in g_ref:
        assert rel_err(g[k], g_ref[k]) <= 1e-5, k


def test_compiled_layers_train_like_eager(tiny_dir, batch):
    assert_trains_like_eager(tiny_dir, batch, lambda m: compile_layers(m, backend="aot_eager", fullgraph=True))


def test_checkpointed_and_compiled_layers_give_the_same_gradients(tiny_dir, batch):
    def configure(m):
        checkpoint_layers(m)
        compile_layers(m, backend="aot_eager", fullgraph=True)

    assert_trains_like_eager(tiny_dir, batch, configure, dropout=0.2)


def test_checkpointing_after_compiling_is_refused(base):
    compile_layers(base, backend="aot_eager")
    with pytest.raises(ValueError, match="before compile_layers"):
        checkpoint_layers(base)


def test_checkpoint_every_other_layer(base):
    checkpoint_layers(base, every=2)
    flags = [getattr(layer, "_wmtp_checkpointed", False) for layer in base.model.layers]
    assert flags == [True, False]
    with pytest.raises(ValueError, match="every must be >= 1"):
        checkpoint_layers(base, every=0)


def test_memory_budget_compiles_through_the_min_cut_partitioner_and_keeps_gradients(tiny_dir, batch):
    def configure(m):
        compile_layers(m, backend="aot_eager_decomp_partition", fullgraph=True, memory_budget=0.3)

    assert_trains_like_eager(tiny_dir, batch, configure)
    assert torch._functorch.config.activation_memory_budget == 1.0  # scoped to the layers' calls


def test_bad_memory_budget(base):
    with pytest.raises(ValueError, match=r"memory_budget must be in \(0, 1\]"):
        compile_layers(base, memory_budget=0.0)


def test_checkpointed_layers_ignore_a_kv_cache_of_a_cache_enabled_forward(tiny_dir, batch):
    """HF's forward with use_cache=True hands each layer a cache; a checkpointed layer that kept
    it would append its keys again when recomputed in backward (doubled keys, wrong shapes)."""
    plain = load_base(tiny_dir)
    install_slots(plain)
    ckpt = load_base(tiny_dir)
    install_slots(ckpt)
    checkpoint_layers(ckpt)
    adapter, spec = init(plain, AdapterSpec(rank=4, alpha=8.0), seed=0)
    adapter = randomize(adapter, seed=1)
    out_ref, g_ref = grads(plain, adapter, spec, {**batch, "use_cache": True})
    out, g = grads(ckpt, adapter, spec, {**batch, "use_cache": True})
    assert torch.equal(out, out_ref)
    for k in g_ref:
        assert rel_err(g[k], g_ref[k]) <= 1e-6, k
