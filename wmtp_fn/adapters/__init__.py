"""LoRA adapters as TensorDict pytrees over a frozen, slotted base.

    install_slots(base)                       # once
    adapter, spec = init(base, AdapterSpec(rank=16, alpha=32))
    logits = apply(base, adapter, spec, input_ids=ids).logits
"""

from wmtp_fn.adapters.lora import apply, bind, bound, expected_shapes, from_flat, init, target_paths, to_flat, validate
from wmtp_fn.adapters.merge import delta_weights, export_merged, merge, merged_into, unmerge, weight_norms
from wmtp_fn.adapters.peft_io import export_peft, import_peft
from wmtp_fn.adapters.slots import LoRASlot, install_slots, lora_delta, slot_paths
from wmtp_fn.adapters.spec import META_ALIASES, TARGETS, AdapterSpec, resolve_targets

__all__ = [
    "AdapterSpec",
    "LoRASlot",
    "META_ALIASES",
    "TARGETS",
    "apply",
    "bind",
    "bound",
    "delta_weights",
    "expected_shapes",
    "export_merged",
    "export_peft",
    "from_flat",
    "import_peft",
    "init",
    "install_slots",
    "lora_delta",
    "merge",
    "merged_into",
    "resolve_targets",
    "slot_paths",
    "target_paths",
    "to_flat",
    "unmerge",
    "validate",
    "weight_norms",
]
