"""The decoder stack of a HuggingFace Llama, run directly: embed → rotary → layers → norm.

`LlamaModel.forward` inspects its inputs on the host every call (with no attention mask it
looks for packed sequences, `(…).all()`): a device sync per step. Training batches need no
mask at all when they are unpadded or right-padded (causal attention never looks right), so
this forward builds HF's 4D mask only for other padding, and otherwise lets attention take its
unmasked causal kernel. The decoder layers are HF's own modules (compiled, checkpointed or
FSDP-sharded per layer as usual); outputs equal `LlamaModel`'s exactly (tested).
"""

from __future__ import annotations

import inspect

import torch
from torch import nn
from transformers import masking_utils

_MASK_PARAMS = inspect.signature(masking_utils.create_causal_mask).parameters
# Attention kernels that are causal by themselves when given no mask. Any other implementation
# (HF's eager or flex attention) needs the causal mask built explicitly, or it attends ahead.
CAUSAL_WITHOUT_MASK = ("sdpa", "flash_attention_2", "flash_attention_3")


def right_padded(attention_mask: torch.Tensor) -> bool:
    """True if every row is ones then zeros (no padding, or padding on the right only).
    A host-side check: call it on the CPU batch, before moving it to the device."""
    m = attention_mask.to(torch.int8)
    return bool((m[:, 1:] <= m[:, :-1]).all()) and bool(m[:, 0].all())


def _mask_kwargs(config, hidden: torch.Tensor, attention_mask, positions: torch.Tensor) -> dict:
    """Arguments of `create_causal_mask` under the installed transformers: the embeddings and
    the (absent) cache have been renamed across versions (`input_embeds` / `inputs_embeds`,
    `past_key_values` / `cache`), and `cache_position` was dropped."""
    kwargs = {"config": config, "attention_mask": attention_mask, "position_ids": positions}
    kwargs["inputs_embeds" if "inputs_embeds" in _MASK_PARAMS else "input_embeds"] = hidden
    kwargs["cache" if "cache" in _MASK_PARAMS else "past_key_values"] = None
    if "cache_position" in _MASK_PARAMS:
        kwargs["cache_position"] = positions[0]
    return kwargs


def embed(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
    """Token embeddings and the per-call attention inputs of a `LlamaModel`-like module:
    `(hidden [B, T, d], rope (cos, sin), mask or None, positions [1, T])`. A mask is built only
    for a padded batch that is not right-padded, or for an attention kernel that is not causal
    by itself (see `decoder_forward`)."""
    hidden = model.embed_tokens(input_ids)
    positions = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
    rope = model.rotary_emb(hidden, positions)
    mask = None
    if attention_mask is not None or model.config._attn_implementation not in CAUSAL_WITHOUT_MASK:
        mask = masking_utils.create_causal_mask(**_mask_kwargs(model.config, hidden, attention_mask, positions))
    return hidden, rope, mask, positions


def run_layers(layers, hidden: torch.Tensor, rope, mask, positions: torch.Tensor) -> torch.Tensor:
    """Run decoder layers in order: hidden [B, T, d] -> [B, T, d]."""
    for layer in layers:
        out = layer(hidden, attention_mask=mask, position_ids=positions, position_embeddings=rope)
        hidden = out[0] if isinstance(out, tuple) else out  # transformers 4.x returns a tuple
    return hidden


def unembedding(model: nn.Module) -> torch.Tensor:
    """The unembedding weight `[V, d]` that hidden states after the final norm are scored with
    (`lm_head.weight`, tied or not): the one place a sharded base will unshard it from."""
    head = getattr(model, "lm_head", None)
    if head is None:
        raise ValueError(f"{type(model).__name__} has no lm_head (load the base as a causal LM)")
    return head.weight


def decoder_forward(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Final (normalised) hidden states `[B, T, d]` of a `LlamaModel`-like module.

    input_ids: [B, T]; attention_mask: [B, T] or None. Pass None for unpadded or right-padded
    batches (see `right_padded`); any other mask goes through HF's own mask construction, as
    does every call with an attention implementation that is not causal by itself.
    """
    hidden, rope, mask, positions = embed(model, input_ids, attention_mask)
    return model.norm(run_layers(model.layers, hidden, rope, mask, positions))


class HiddenStates(nn.Module):
    """A view of a base (`LlamaForCausalLM` or `LlamaModel`) whose forward is `decoder_forward`.

    Submodules keep the base's own paths (`model.layers.0…` for a causal LM, `layers.0…` for a
    bare `LlamaModel`), so an adapter rooted at the base binds to this view unchanged:
    `apply(HiddenStates(base), adapter, spec, input_ids=…)`.
    """

    def __init__(self, base: nn.Module):
        super().__init__()
        inner = getattr(base, "model", None)
        self._prefixed = inner is not None and hasattr(inner, "layers")
        if self._prefixed:
            self.model = inner
        elif hasattr(base, "layers"):
            for name in ("embed_tokens", "rotary_emb", "layers", "norm"):
                self.add_module(name, getattr(base, name))
            self.config = base.config
        else:
            raise ValueError(f"{type(base).__name__} is not a HF Llama (no decoder layers)")

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return decoder_forward(self.model if self._prefixed else self, input_ids, attention_mask)
