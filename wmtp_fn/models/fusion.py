"""Graph pass: the LoRA `A` projections of one input merged into one GEMM.

In a Llama layer q/k/v read the same normed hidden states, and so do gate/up. Their LoRA
terms each start with a skinny, memory-bound `x·Aᵀ` (`[N, in] × [in, r]`), so the layer reads
`x` once per target, and the backward repeats the pattern (`dA = duᵀ·x` and `dx += du·A` per
target). Rewriting `x·A_qᵀ, x·A_kᵀ, x·A_vᵀ` as `u = x·[A_q; A_k; A_v]ᵀ`, split along its last
dimension, computes exactly the same values with one GEMM. Autograd then derives the
backward of the merged form, so `dA` and `dx` are one GEMM each too.

The pass runs on the layer's graph before autograd (Inductor's pre-grad hook), so it touches
only compiled layers; eager execution is unchanged. It matches `linear(x, A)` calls without a
bias whose weight is a slot's bound `lora_A` (a graph input named after the slot buffer) and
groups those sharing the same input node. Dropout gives each target its own input, so
dropped-out adapters are left as they are.
"""

from __future__ import annotations

import hashlib
import inspect

import torch
from torch import fx

try:
    from torch._inductor.custom_graph_pass import CustomGraphPass
except ImportError:  # an older torch: a plain callable (Inductor then skips its graph cache)
    CustomGraphPass = object


def _is_lora_a(node: fx.Node) -> bool:
    """A graph input bound to a slot's `lora_A` buffer (Dynamo names inputs after their source)."""
    return node.op == "placeholder" and node.name.lower().endswith("lora_a_")


def _rank(node: fx.Node) -> int | None:
    value = node.meta.get("example_value")
    return int(value.shape[0]) if isinstance(value, torch.Tensor) and value.dim() == 2 else None


def merge_shared_lora_a(graph: fx.Graph) -> int:
    """Merge the bias-free `linear(x, lora_A)` calls that share `x` into one `linear` on the
    concatenated `A`s, in place; returns how many calls were merged away."""
    groups: dict[fx.Node, list[fx.Node]] = {}
    for node in graph.nodes:
        if (node.op == "call_function" and node.target is torch._C._nn.linear and len(node.args) == 2
                and not node.kwargs and isinstance(node.args[1], fx.Node) and _is_lora_a(node.args[1])
                and _rank(node.args[1]) is not None):
            groups.setdefault(node.args[0], []).append(node)
    merged = 0
    for x, calls in groups.items():
        if len(calls) < 2:
            continue
        pieces, start = [], 0
        with graph.inserting_before(calls[0]):  # x and every A are defined before the first call
            weights = graph.call_function(torch.cat, ([c.args[1] for c in calls], 0))
            u = graph.call_function(torch._C._nn.linear, (x, weights))
            for call in calls:
                rank = _rank(call.args[1])
                pieces.append(graph.call_function(torch.narrow, (u, -1, start, rank)))
                start += rank
        for call, piece in zip(calls, pieces):  # erased only now: nodes were being inserted before calls[0]
            call.replace_all_uses_with(piece)
            graph.erase_node(call)
        merged += len(calls) - 1
    return merged


class MergeSharedLoraA(CustomGraphPass):
    """`merge_shared_lora_a` as Inductor's pre-grad pass (with a uuid, so compiled graphs stay
    cacheable)."""

    def __call__(self, graph: fx.Graph) -> None:
        merge_shared_lora_a(graph)

    def uuid(self) -> bytes:
        return hashlib.sha256(inspect.getsource(merge_shared_lora_a).encode()).digest()


MERGE_SHARED_LORA_A = MergeSharedLoraA()
