"""The frozen base: build or load a HuggingFace Llama (or an MTP base), freeze it, and record
what it is once: `Base(module, kind, fingerprint, path)`.

The base is built once per process and never mutated by training. Adapters store the
fingerprint of the base they were trained on, so loading one onto another base fails loudly;
the record computes it once, at load, before any sharding (`prepare` owns what happens next).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, LlamaModel

from wmtp_fn.fingerprint import check_same_base, fingerprint  # noqa: F401  (re-exported)

KINDS = {"causal_lm": LlamaForCausalLM, "model": LlamaModel}

def tiny_llama_config(vocab_size: int = 1024, **overrides) -> LlamaConfig:
    """A Llama small enough for CPU tests and the embedded demo (~0.2M parameters)."""
    cfg = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=176,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
        attn_implementation="sdpa",
    )
    cfg.update(overrides)
    return LlamaConfig(**cfg)


def freeze(model: nn.Module) -> nn.Module:
    """Freeze every parameter and switch to eval mode (no HF dropout); returns the same module."""
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def build_base(
    config: LlamaConfig, *, kind: str = "causal_lm", seed: int = 0, dtype: torch.dtype = torch.float32
) -> nn.Module:
    """A randomly initialised, frozen Llama (seeded, so the same seed gives the same weights)."""
    cls = _kind(kind)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(config)
    return freeze(model.to(dtype))


@dataclass(frozen=True)
class Base:
    """A frozen base and what identifies it.

    module: the `nn.Module` (`LlamaForCausalLM`, `LlamaModel` or `MTPLlama`), frozen, eval mode.
    kind: `"causal_lm"`, `"model"` or `"mtp"`. fingerprint: `wmtp_fn.fingerprint.fingerprint` of
    the unsharded weights, computed once here (every adapter init/validate/import reads it).
    path: the directory it was loaded from, or None for a base built in memory.
    """

    module: nn.Module
    kind: str
    fingerprint: dict[str, str]
    path: str | None = None

    @staticmethod
    def of(module: nn.Module, kind: str, path: str | Path | None = None) -> "Base":
        """Record an already frozen module (fingerprinted now)."""
        return Base(module, kind, fingerprint(module), None if path is None else str(path))


def open_base(
    path: str | Path,
    *,
    kind: str = "causal_lm",
    dtype: torch.dtype | str = torch.float32,
    device: str | torch.device = "cpu",
    attn_implementation: str | None = "sdpa",
    key: str = "base.path",
) -> Base:
    """Check `path` (`check_base_dir`: a clear error naming `key` before any weight is read),
    load it frozen, and record it. An MTP base directory (see `models.mtp`) is recognised from
    its config.json and loads as kind `"mtp"` whatever `kind` says."""
    cfg = check_base_dir(path, key=key)
    from wmtp_fn.models.mtp import is_mtp_config, load_mtp

    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    if is_mtp_config(cfg):
        module = freeze(load_mtp(path, dtype=dtype, device=device, attn_implementation=attn_implementation))
        return Base.of(module, "mtp", path)
    return Base.of(_load_llama(path, kind, dtype, device, attn_implementation), kind, path)


def load_base(
    path: str | Path,
    *,
    kind: str = "causal_lm",
    dtype: torch.dtype | str = torch.float32,
    device: str | torch.device = "cpu",
    attn_implementation: str | None = "sdpa",
) -> nn.Module:
    """Load a HuggingFace Llama from a local directory (`from_pretrained`), frozen, in eval mode.
    The directory is checked first (`check_base_dir`), so another architecture is refused before
    any weight is read. `open_base` returns the module with its record."""
    check_base_dir(path, key="base directory")
    return _load_llama(path, kind, dtype, device, attn_implementation)


def _load_llama(path, kind: str, dtype, device, attn_implementation: str | None) -> nn.Module:
    """`from_pretrained` of a checked directory, frozen and moved to `device`."""
    path = Path(path)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    kwargs = {"dtype": dtype}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    model = _kind(kind).from_pretrained(str(path), **kwargs)
    return freeze(model.to(device))


def _kind(kind: str) -> type:
    if kind not in KINDS:
        raise ValueError(f"unknown base kind {kind!r}; expected one of {sorted(KINDS)}")
    return KINDS[kind]


# Architectures (config.json `model_type`) whose weights load into a HF Llama unchanged.
SUPPORTED_MODEL_TYPES = ("llama",)


def check_base_dir(path: str | Path, *, key: str = "base.path") -> dict:
    """Read `path/config.json` and refuse anything that is not a supported architecture,
    before any weight (or tokenizer) is loaded. Returns the parsed config.json.

    Raises `BaseModelError` with one line naming `key`: a missing directory, no config.json,
    invalid JSON, or another `model_type` (a GPT-2 directory would otherwise be instantiated
    as a Llama of the wrong shape).
    """
    from wmtp_fn.errors import BaseModelError

    path = Path(path)
    if not path.is_dir():
        raise BaseModelError(f"{key}: {str(path)!r} is not a directory (expected a HuggingFace model directory)")
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise BaseModelError(f"{key}: {str(path)!r} has no config.json (expected a HuggingFace model directory)")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BaseModelError(f"{key}: {cfg_path} is not valid JSON ({e})") from None
    model_type = cfg.get("model_type") if isinstance(cfg, dict) else None
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise BaseModelError(
            f"{key}: {str(path)!r} is a {model_type or 'unknown'} model; wmtp_fn supports "
            f"Llama-architecture models ({', '.join(SUPPORTED_MODEL_TYPES)}, and the MTP format)"
        )
    return cfg


def embedded_base_dir(out_dir: str | Path, tokenizer, *, hidden_size: int, layers: int) -> Path:
    """The embedded demo's base: a tiny random Llama (fixed seed, sized to `tokenizer`) written
    once to `out_dir/base` with `save_pretrained`, so it loads through the real loading code."""
    path = Path(out_dir) / "base"
    if not (path / "config.json").is_file():
        cfg = tiny_llama_config(
            vocab_size=len(tokenizer),
            hidden_size=hidden_size,
            intermediate_size=int(hidden_size * 8 / 3 + 63) // 64 * 64,
            num_hidden_layers=layers,
            num_attention_heads=max(1, hidden_size // 32),
            num_key_value_heads=max(1, hidden_size // 64),
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        build_base(cfg, seed=0).save_pretrained(path)
    return path
