"""wmtp_fn: a functional, explicit-state training core for weighted multi-token prediction.

LoRA adapters are TensorDict pytrees bound over one frozen HuggingFace base through
``torch.func.functional_call``; losses are pure functions of ``(params, batch)``.
"""

__version__ = "0.1.0"
