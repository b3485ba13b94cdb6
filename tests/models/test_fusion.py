"""The pre-grad pass that merges LoRA `x·Aᵀ` projections of one input into one GEMM: the graph
rewrite by hand on small FX graphs, and through `compile_layers` on a Llama (Inductor on CPU):
the same outputs and adapter gradients as the unmerged layers, and the calls it merged."""

import pytest
import torch
from torch import fx

from tests.models.test_layers import assert_trains_like_eager
from wmtp_fn.models import fusion
from wmtp_fn.models.fusion import MERGE_SHARED_LORA_A, merge_shared_lora_a
from wmtp_fn.models.layers import compile_layers, with_merge_pass


def graph_of(n_in: int, uses: list[tuple[str, str]], ranks: dict[str, int], d: int = 8, lead: tuple = (4,)):
    """An FX graph with inputs `x*` ([*lead, d]) and weights (named like Dynamo names slot
    buffers), one `linear(x, w)` per (x, w) in `uses`, returning all of them; and example inputs."""
    g = fx.Graph()
    xs = {f"x{i}": g.placeholder(f"x{i}") for i in range(n_in)}
    ws = {}
    for name, r in ranks.items():
        ws[name] = g.placeholder(name)
        ws[name].meta["example_value"] = torch.empty(r, d)
    outs = [g.call_function(torch._C._nn.linear, (xs[x], ws[w])) for x, w in uses]
    g.output(tuple(outs))
    gen = torch.Generator().manual_seed(0)
    inputs = [torch.randn(*lead, d, generator=gen) for _ in xs] + [torch.randn(r, d, generator=gen) for r in ranks.values()]
    return g, inputs


def run(graph: fx.Graph, inputs):
    return fx.GraphModule(torch.nn.Module(), graph)(*inputs)


def linears(graph: fx.Graph) -> list[fx.Node]:
    return [n for n in graph.nodes if n.op == "call_function" and n.target is torch._C._nn.linear]


def test_a_projections_of_one_input_become_one_linear_with_the_same_values():
    ranks = {"l_q_buffers_lora_a_": 2, "l_k_buffers_lora_a_": 3, "l_v_buffers_lora_a_": 2}
    g, inputs = graph_of(1, [("x0", w) for w in ranks], ranks)
    want = run(g, inputs)
    assert merge_shared_lora_a(g) == 2
    g.lint()
    assert len(linears(g)) == 1
    (merged,) = linears(g)
    assert merged.args[1].target is torch.cat
    assert [w.name for w in merged.args[1].args[0]] == list(ranks)  # in call order
    got = run(g, inputs)
    assert [t.shape for t in got] == [(4, 2), (4, 3), (4, 2)]
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    for a, x, w in zip(got, [inputs[0]] * 3, inputs[1:]):  # against a hand computation
        torch.testing.assert_close(a, x @ w.T, rtol=0, atol=1e-6)


def test_only_slot_A_inputs_shared_by_two_calls_are_merged():
    ranks = {"weight_q": 4, "weight_k": 4, "l_o_buffers_lora_a_": 2, "l_gate_buffers_lora_a_": 2,
             "l_up_buffers_lora_a_": 2, "l_b_buffers_lora_b_": 2}
    uses = [("x0", "weight_q"), ("x0", "weight_k"),  # base weights: never merged
            ("x1", "l_o_buffers_lora_a_"),  # alone on its input
            ("x2", "l_gate_buffers_lora_a_"), ("x0", "l_up_buffers_lora_a_"),  # A's on different inputs
            ("x2", "l_b_buffers_lora_b_")]  # a B is not an A
    g, inputs = graph_of(3, uses, ranks)
    assert merge_shared_lora_a(g) == 0
    assert len(linears(g)) == 6


def test_a_linear_with_a_bias_or_an_unknown_rank_is_left_alone():
    ranks = {"l_q_buffers_lora_a_": 2, "l_k_buffers_lora_a_": 2}
    g, inputs = graph_of(1, [("x0", w) for w in ranks], ranks)
    first = linears(g)[0]
    first.args = (*first.args, None)  # an explicit bias argument
    assert merge_shared_lora_a(g) == 0
    g, inputs = graph_of(1, [("x0", w) for w in ranks], ranks)
    del next(n for n in g.nodes if n.name == "l_k_buffers_lora_a_").meta["example_value"]
    assert merge_shared_lora_a(g) == 0


def test_two_groups_in_one_graph():
    ranks = {"q_lora_a_": 2, "k_lora_a_": 2, "v_lora_a_": 2, "gate_lora_a_": 3, "up_lora_a_": 3}
    uses = [("x0", "q_lora_a_"), ("x0", "k_lora_a_"), ("x0", "v_lora_a_"), ("x1", "gate_lora_a_"), ("x1", "up_lora_a_")]
    g, inputs = graph_of(2, uses, ranks)
    want = run(g, inputs)
    assert merge_shared_lora_a(g) == 3
    assert len(linears(g)) == 2
    for a, b in zip(run(g, inputs), want):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_the_pass_has_a_stable_uuid_for_the_compile_cache():
    assert MERGE_SHARED_LORA_A.uuid() == fusion.MergeSharedLoraA().uuid()
    assert len(MERGE_SHARED_LORA_A.uuid()) == 32


def test_with_merge_pass_turns_a_mode_into_its_options():
    kw = with_merge_pass({"mode": "max-autotune-no-cudagraphs", "fullgraph": True})
    assert "mode" not in kw and kw["fullgraph"] is True
    assert kw["options"]["max_autotune"] is True and kw["options"]["pre_grad_custom_pass"] is MERGE_SHARED_LORA_A
    assert with_merge_pass({"options": {"max_autotune": False}})["options"] == {
        "max_autotune": False, "pre_grad_custom_pass": MERGE_SHARED_LORA_A}
    assert with_merge_pass({"mode": "default"})["options"] == {"pre_grad_custom_pass": MERGE_SHARED_LORA_A}


@pytest.mark.parametrize("spec_kw, dynamic", [(dict(), False), (dict(use_dora=True), False), (dict(), True)])
def test_compiled_llama_layers_merge_qkv_and_gate_up_and_train_like_eager(tiny_dir, batch, monkeypatch, spec_kw, dynamic):
    """Also with dynamic shapes, as `models.prepare` compiles for the pipelines."""
    merged = []
    real = fusion.merge_shared_lora_a
    monkeypatch.setattr(fusion, "merge_shared_lora_a", lambda g: merged.append(real(g)) or merged[-1])
    with torch._inductor.config.patch(force_disable_caches=True):  # a cached graph skips the pass
        assert_trains_like_eager(tiny_dir, batch, lambda m: compile_layers(m, fullgraph=True, dynamic=dynamic), **spec_kw)
    # per compiled graph: q, k, v -> one (2 merged away), gate, up -> one (1); layer 0 has its own graph
    assert merged and all(n == 3 for n in merged)


@pytest.mark.parametrize("kw, wants_pass", [(dict(), True), (dict(memory_budget=0.5), True),
                                           (dict(merge_lora_a=False), False), (dict(backend="aot_eager"), False)])
def test_which_compiles_get_the_pass(base, monkeypatch, kw, wants_pass):
    seen = []
    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda *a, **k: seen.append(k) or real(*a, **k))
    compile_layers(base, fullgraph=True, **kw)
    assert len(seen) == len(base.model.layers)
    assert all(k["fullgraph"] is True for k in seen)
    assert all((k.get("options", {}).get("pre_grad_custom_pass") is MERGE_SHARED_LORA_A) == wants_pass for k in seen)


def test_a_group_after_a_lone_projection_is_still_merged():
    ranks = {"o_lora_a_": 2, "q_lora_a_": 2, "k_lora_a_": 2}
    g, inputs = graph_of(2, [("x1", "o_lora_a_"), ("x0", "q_lora_a_"), ("x0", "k_lora_a_")], ranks)
    assert MERGE_SHARED_LORA_A(g) is None  # Inductor's hook: rewrites in place
    assert len(linears(g)) == 2


def test_batched_inputs_split_along_the_rank_axis():
    """x [B, T, d] as in a decoder layer: u is split along its last axis, not along T."""
    ranks = {"q_lora_a_": 3, "k_lora_a_": 2}
    g, inputs = graph_of(1, [("x0", w) for w in ranks], ranks, lead=(2, 5))
    want = run(g, inputs)
    merge_shared_lora_a(g)
    got = run(g, inputs)
    assert [t.shape for t in got] == [(2, 5, 3), (2, 5, 2)]
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_a_projection_used_before_the_next_one_is_computed_stays_in_order():
    """In a layer each `x·Aᵀ` is consumed (`·Bᵀ`) before the next target's is computed: the merged
    GEMM and its pieces must come before the first consumer."""
    g = fx.Graph()
    x = g.placeholder("x0")
    ws = {}
    for name in ("q_lora_a_", "q_lora_b_", "k_lora_a_"):
        ws[name] = g.placeholder(name)
        ws[name].meta["example_value"] = torch.empty(2, 8)
    uq = g.call_function(torch._C._nn.linear, (x, ws["q_lora_a_"]))
    dq = g.call_function(torch._C._nn.linear, (uq, ws["q_lora_b_"]))  # the B term: [4, 2] · [2, 2]ᵀ
    uk = g.call_function(torch._C._nn.linear, (x, ws["k_lora_a_"]))
    g.output((dq, uk))
    gen = torch.Generator().manual_seed(0)
    inputs = [torch.randn(4, 8, generator=gen), torch.randn(2, 8, generator=gen), torch.randn(2, 2, generator=gen),
              torch.randn(2, 8, generator=gen)]
    ws["q_lora_b_"].meta["example_value"] = torch.empty(2, 2)
    want = run(g, inputs)
    assert merge_shared_lora_a(g) == 1
    g.lint()  # every node defined before its use
    for a, b in zip(run(g, inputs), want):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
