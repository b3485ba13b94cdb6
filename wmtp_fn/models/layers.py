"""Per-decoder-layer execution options: regional `torch.compile` and activation checkpointing.

Both act on each decoder layer in place and keep parameter names (state dicts, adapter keys and
FSDP wrapping are unchanged).

Activation checkpointing has a trap with adapters bound by `functional_call`: the backward
pass, which recomputes the layer, runs *after* the binding has been undone, so a plain
`torch.utils.checkpoint` would recompute the layer with empty slots (wrong gradients or a
recomputation mismatch). `checkpoint_layers` therefore captures the tensors bound to the
layer's slots at forward time and binds them again for the recomputation.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers.cache_utils import Cache

from wmtp_fn.adapters.slots import SLOT_TENSORS, filled, slot_paths
from wmtp_fn.models.fusion import MERGE_SHARED_LORA_A


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder layers of a HF Llama (`LlamaForCausalLM` or `LlamaModel`), and of an MTP
    base the extra heads after them."""
    inner = getattr(model, "model", model)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__} has no decoder `layers`")
    return list(layers) + list(getattr(model, "extra_heads", []))


def compile_layers(
    model: nn.Module, *, memory_budget: float | None = None, merge_lora_a: bool = True, **compile_kwargs
) -> nn.Module:
    """`torch.compile` each decoder layer separately (regional compilation): one graph serves
    every layer, compile time stays small, and adapters bound by `functional_call` are graph
    inputs, so swapping adapters of the same shapes does not recompile.

    memory_budget: in (0, 1], the share of the activations the compiler's partitioner would
    save for backward that it may keep; below 1 it recomputes the cheapest ones instead (a
    finer trade than checkpointing whole layers). Applied to these layers only, when they
    compile. None (or 1): the compiler's default.

    merge_lora_a: with Inductor (the default backend), the LoRA `x·Aᵀ` of targets that share
    their input (q/k/v, gate/up) run as one GEMM (`models.fusion`; the same values, fewer
    skinny GEMMs forward and backward). Other backends compile the layers as they are.

    On a checkpointed layer only the inner forward is compiled: the re-binding around the
    recomputation stays eager (Dynamo cannot trace buffer swaps inside a checkpoint region).
    """
    if memory_budget is not None and not 0.0 < memory_budget <= 1.0:
        raise ValueError(f"compile_layers: memory_budget must be in (0, 1], got {memory_budget}")
    if merge_lora_a and compile_kwargs.get("backend", "inductor") == "inductor":
        compile_kwargs = with_merge_pass(compile_kwargs)
    if memory_budget == 1.0:  # the compiler's default: nothing to scope
        memory_budget = None
    for layer in decoder_layers(model):
        if getattr(layer, "_wmtp_checkpointed", False):
            layer._wmtp_forward = _within_budget(torch.compile(layer._wmtp_forward, **compile_kwargs), memory_budget)
        elif memory_budget is None:
            layer.compile(**compile_kwargs)
        else:
            inner = torch.compile(type(layer).forward.__get__(layer), **compile_kwargs)
            layer.forward = _within_budget(inner, memory_budget)
    return model


def with_merge_pass(compile_kwargs: dict) -> dict:
    """`torch.compile` keyword arguments with `models.fusion`'s pass as Inductor's pre-grad
    pass. `torch.compile` takes a `mode` or `options`, not both, so a mode becomes its options."""
    kwargs = dict(compile_kwargs)
    mode = kwargs.pop("mode", None)
    options = dict(torch._inductor.list_mode_options(mode)) if mode not in (None, "default") else {}
    options.update(kwargs.pop("options", None) or {})
    options["pre_grad_custom_pass"] = MERGE_SHARED_LORA_A
    return {**kwargs, "options": options}


def _within_budget(fn, budget: float | None):
    """Run `fn` with the partitioner's activation memory budget set (read when it compiles)."""
    if budget is None:
        return fn

    def call(*args, **kwargs):
        with torch._functorch.config.patch(activation_memory_budget=budget):
            return fn(*args, **kwargs)

    return call


def checkpoint_layers(model: nn.Module, every: int = 1) -> nn.Module:
    """Recompute decoder layers' activations in backward instead of storing them: every
    layer (`every=1`), or every `every`-th one (a memory/speed trade-off between none and all).
    Apply before `compile_layers`."""
    if every < 1:
        raise ValueError(f"checkpoint_layers: every must be >= 1, got {every}")
    for layer in decoder_layers(model)[::every]:
        if getattr(layer, "_wmtp_checkpointed", False):
            continue
        if getattr(layer, "_compiled_call_impl", None) is not None or "forward" in vars(layer):
            raise ValueError("checkpoint_layers must be applied before compile_layers")
        layer._wmtp_forward = type(layer).forward.__get__(layer)  # the class's forward, bound
        layer.forward = _checkpointed_forward(layer)
        layer._wmtp_checkpointed = True
    return model


def _checkpointed_forward(layer: nn.Module):
    slots = slot_paths(layer)

    def run(bound: dict[str, torch.Tensor], *args, **kwargs):
        with filled(slots, bound):
            return layer._wmtp_forward(*args, **kwargs)

    def checkpointed(*args, **kwargs):
        bound = {}
        for path, slot in slots.items():
            for name in SLOT_TENSORS:
                t = getattr(slot, name)
                if t is not None:
                    bound[f"{path}.{name}"] = t
        if not torch.is_grad_enabled():
            return layer._wmtp_forward(*args, **kwargs)
        return checkpoint(run, bound, *args, use_reentrant=False, **_without_cache(kwargs))

    return checkpointed


def _without_cache(kwargs: dict) -> dict:
    """The layer's keyword arguments minus any KV cache: a cache would be appended to twice
    (in the forward and again in the recomputation, doubling the keys the attention sees), and
    training has no use for it, so checkpointed layers run without one, as HF's own
    checkpointing does. Caches are recognised by type, since transformers has renamed the
    argument across versions (`past_key_value`, `past_key_values`, `cache`)."""
    out = {k: v for k, v in kwargs.items() if not isinstance(v, Cache) and k not in _CACHE_ARGS}
    if "use_cache" in out:
        out["use_cache"] = False
    return out


_CACHE_ARGS = ("past_key_value", "past_key_values", "cache")
