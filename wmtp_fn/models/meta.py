"""Meta's MTP release format <-> the project's MTP base, and the seeds' policy adapters.

Meta ships `params.json` (`dim, n_layers, n_heads, n_kv_heads, vocab_size, multiple_of,
ffn_dim_multiplier, norm_eps, rope_theta, n_future_tokens`) and `consolidated.pth`
(`tok_embeddings`, `layers.{i}.attention.{wq,wk,wv,wo}`, `layers.{i}.feed_forward.{w1,w2,w3}`,
`layers.{i}.{attention,ffn}_norm`, `extra_heads.{j}.…`, `norm`, `output`).

Meta's RoPE rotates adjacent pairs `(x[2i], x[2i+1])`; HF's Llama rotates halves
`(x[i], x[i + hd/2])`. Permuting the rows of `wq` and `wk` within each head (Meta order
`[0, 1, 2, 3, …]` -> HF order `[0, 2, 4, …, 1, 3, 5, …]`) makes the two forwards compute the same
function, since q·k is unchanged when q and k are permuted alike. The same permutation applies to
the rows of q/k `lora_B` when an adapter moves between layouts.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from einops import rearrange

from wmtp_fn.models.mtp import MTPLlama, _fresh_rotary, mtp_config

# Meta name -> HF name inside one decoder block.
_BLOCK = {
    "attention.wq": "self_attn.q_proj",
    "attention.wk": "self_attn.k_proj",
    "attention.wv": "self_attn.v_proj",
    "attention.wo": "self_attn.o_proj",
    "feed_forward.w1": "mlp.gate_proj",
    "feed_forward.w2": "mlp.down_proj",
    "feed_forward.w3": "mlp.up_proj",
    "attention_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_TOP = {"tok_embeddings": "model.embed_tokens", "norm": "model.norm", "output": "lm_head"}
_KEY = re.compile(r"^(layers|extra_heads)\.(\d+)\.(.+)$")


def ffn_hidden(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """Meta's FFN width: `int(2·4d/3)`, times the multiplier if set, rounded up to `multiple_of`
    (11008 for d = 4096, multiple_of 256)."""
    hidden = int(2 * 4 * dim / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def config_from_params(params: Mapping, *, max_position_embeddings: int = 4096):
    """The MTP base config of a Meta `params.json`."""
    need = ("dim", "n_layers", "n_heads", "vocab_size", "multiple_of", "norm_eps")
    missing = [k for k in need if k not in params]
    if missing:
        raise ValueError(f"params.json is missing {missing} (expected Meta's MTP release format)")
    return mtp_config(
        int(params.get("n_future_tokens", 1)),
        vocab_size=int(params["vocab_size"]),
        hidden_size=int(params["dim"]),
        intermediate_size=ffn_hidden(params["dim"], params["multiple_of"], params.get("ffn_dim_multiplier")),
        num_hidden_layers=int(params["n_layers"]),
        num_attention_heads=int(params["n_heads"]),
        num_key_value_heads=int(params.get("n_kv_heads") or params["n_heads"]),
        rms_norm_eps=float(params["norm_eps"]),
        rope_theta=float(params.get("rope_theta", 10000.0)),
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=False,
    )


def meta_to_hf_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of a q/k projection (or q/k `lora_B`) from Meta's pair layout to HF's half layout:
    within each head, `[0, 1, 2, 3, …]` -> `[0, 2, 4, …, 1, 3, 5, …]`. w: [n_heads·hd, *]."""
    return rearrange(w, "(h half two) c -> (h two half) c", h=n_heads, two=2)


def hf_to_meta_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of `meta_to_hf_rows`."""
    return rearrange(w, "(h two half) c -> (h half two) c", h=n_heads, two=2)


def _hf_name(meta_name: str) -> str:
    top, _, leaf = meta_name.rpartition(".")
    if top in _TOP:
        return f"{_TOP[top]}.{leaf}"
    m = _KEY.match(top)
    if m is None or m.group(3) not in _BLOCK:
        raise KeyError(f"{meta_name!r} is not a tensor name of Meta's MTP format")
    group = "model.layers" if m.group(1) == "layers" else "extra_heads"
    return f"{group}.{m.group(2)}.{_BLOCK[m.group(3)]}.{leaf}"


def _row_heads(hf_name: str, config) -> int | None:
    """Heads to permute the rows of this tensor by (q: attention heads, k: KV heads), or None."""
    if ".self_attn.q_proj." in hf_name:
        return config.num_attention_heads
    if ".self_attn.k_proj." in hf_name:
        return config.num_key_value_heads
    return None


def meta_to_hf_state(state: Mapping[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """Meta tensor names and q/k row layout -> the `MTPLlama` state dict. Also converts LoRA
    leaves (`….wq.lora_A`, `lora_B`): only q/k `lora_B` rows are permuted (A reads the input)."""
    out = {}
    for name, t in state.items():
        hf = _hf_name(name)
        heads = _row_heads(hf, config)
        out[hf] = meta_to_hf_rows(t, heads) if heads and not hf.endswith("lora_A") else t
    return out


def hf_to_meta_state(state: Mapping[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """Inverse of `meta_to_hf_state`."""
    back = {v: k for k, v in _BLOCK.items()}
    tops = {v: k for k, v in _TOP.items()}
    out = {}
    for name, t in state.items():
        heads = _row_heads(name, config)
        if heads and not name.endswith("lora_A"):
            t = hf_to_meta_rows(t, heads)
        top, _, leaf = name.rpartition(".")
        if top in tops:
            out[f"{tops[top]}.{leaf}"] = t
            continue
        m = re.match(r"^(model\.layers|extra_heads)\.(\d+)\.(.+)$", top)
        if m is None or m.group(3) not in back:
            raise KeyError(f"{name!r} has no counterpart in Meta's MTP format")
        group = "layers" if m.group(1) == "model.layers" else "extra_heads"
        out[f"{group}.{m.group(2)}.{back[m.group(3)]}.{leaf}"] = t
    return out


def convert_meta(src: str | Path, out: str | Path, *, dtype: torch.dtype | None = None) -> Path:
    """Meta's release directory (`params.json` + `consolidated.pth`) -> an MTP base directory."""
    from wmtp_fn.models.mtp import save_mtp

    src, out = Path(src), Path(out)
    for name in ("params.json", "consolidated.pth"):
        if not (src / name).is_file():
            raise FileNotFoundError(f"{src} has no {name} (expected Meta's MTP release: params.json + consolidated.pth)")
    config = config_from_params(json.loads((src / "params.json").read_text()))
    state = torch.load(src / "consolidated.pth", map_location="cpu", weights_only=True)
    hf = meta_to_hf_state(state, config)
    with torch.device("meta"):
        model = MTPLlama(config)
    model.load_state_dict({k: v.to(dtype) if dtype else v for k, v in hf.items()}, strict=True, assign=True)
    _fresh_rotary(model, "cpu")
    save_mtp(model, out)
    return out


def export_meta(model: MTPLlama, out: str | Path) -> Path:
    """An MTP base -> Meta's release format (`params.json` + `consolidated.pth`)."""
    from wmtp_fn.atomic import atomic_dir

    c = model.config
    params = {
        "dim": c.hidden_size, "n_layers": c.num_hidden_layers, "n_heads": c.num_attention_heads,
        "n_kv_heads": c.num_key_value_heads, "vocab_size": c.vocab_size, "norm_eps": c.rms_norm_eps,
        "rope_theta": c.rope_parameters["rope_theta"] if getattr(c, "rope_parameters", None) else c.rope_theta,
        "n_future_tokens": model.n_future, "multiple_of": 1, "ffn_dim_multiplier": None,
    }
    if ffn_hidden(c.hidden_size, 1, None) != c.intermediate_size:  # express the width exactly
        params["ffn_dim_multiplier"] = c.intermediate_size / int(2 * 4 * c.hidden_size / 3)
    state = hf_to_meta_state({k: v.detach().cpu() for k, v in model.state_dict().items()}, c)
    with atomic_dir(Path(out)) as tmp:
        (tmp / "params.json").write_text(json.dumps(params, indent=2) + "\n")
        torch.save(state, tmp / "consolidated.pth")
    return Path(out)


# ----------------------------------------------------------------------------- the seeds' policy files

_LORA_KEY = re.compile(r"^(?:layers|extra_heads)\.\d+\.(?:attention|feed_forward)\.(w[qkvo123])\.lora_[AB]$")


def read_seeds_policy(path: str | Path, config, *, trusted: bool = False):
    """The seeds' MTP policy checkpoint (`checkpoint_type: "lora"`, Meta key names such as
    `layers.3.attention.wq.lora_A`, `lora_config: {rank, alpha}`) as `(flat adapter in the
    project's names and q/k layout, AdapterSpec, meta)`.

    Its `lora_config` omits the targets; they are inferred from the keys present, so every
    weight in the file is kept (the seeds' own evaluation rebuilt attention-only adapters from
    this config and silently dropped the FFN LoRA weights).
    """
    from wmtp_fn.adapters.seeds_io import load_torch_dict
    from wmtp_fn.adapters.spec import META_ALIASES, AdapterSpec

    path = Path(path)
    obj = load_torch_dict(path, trusted=trusted)
    if obj.get("checkpoint_type") != "lora":
        kind = obj.get("checkpoint_type")
        raise ValueError(f"{path}: expected the seeds' MTP policy checkpoint (checkpoint_type 'lora'), got {kind!r}")
    for key in ("lora_state_dict", "lora_config"):
        if key not in obj:
            raise ValueError(f"{path}: policy checkpoint is missing {key!r}")
    flat = {k: v.float() for k, v in obj["lora_state_dict"].items()}
    bad = [k for k in flat if not _LORA_KEY.match(k)]
    if bad:
        raise ValueError(f"{path}: lora_state_dict key {bad[0]!r} is not a Meta-named LoRA leaf "
                         "(expected e.g. 'layers.3.attention.wq.lora_A')")
    if not flat:
        raise ValueError(f"{path}: lora_state_dict is empty")
    cfg = obj["lora_config"]
    if "rank" not in cfg or "alpha" not in cfg:
        raise ValueError(f"{path}: lora_config needs rank and alpha; it has {sorted(cfg)}")
    targets = sorted({META_ALIASES[_LORA_KEY.match(k).group(1)] for k in flat})
    spec = AdapterSpec(rank=int(cfg["rank"]), alpha=float(cfg["alpha"]), dropout=float(cfg.get("dropout", 0.0)),
                       targets=tuple(targets))
    meta = {k: obj.get(k) for k in ("epoch", "train_metrics", "val_metrics", "config", "td_ema_state")}
    return meta_to_hf_state(flat, config), spec, meta


def save_seeds_policy(path: str | Path, flat_adapter: Mapping[str, torch.Tensor], spec, model_config, **meta) -> Path:
    """Write an adapter on the MTP base in the seeds' policy format (for the old tooling):
    Meta names and q/k layout, with the full spec (targets and dropout too) in `lora_config`."""
    from wmtp_fn.atomic import atomic_file

    obj = {
        "checkpoint_type": "lora",
        "lora_state_dict": {k: v.detach().cpu() for k, v in hf_to_meta_state(dict(flat_adapter), model_config).items()},
        "extra_heads_state_dict": {}, "value_head_state_dict": {},
        "lora_config": {"rank": spec.rank, "alpha": float(spec.alpha), "dropout": float(spec.dropout),
                        "target_modules": [k for k, v in _META_NAMES.items() if v in spec.targets]},
        **{k: meta.get(k) for k in ("epoch", "train_metrics", "val_metrics", "config")},
    }
    with atomic_file(Path(path)) as tmp:
        torch.save(obj, tmp)
    return Path(path)


_META_NAMES = {"wq": "q_proj", "wk": "k_proj", "wv": "v_proj", "wo": "o_proj", "w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}


def main(argv: list[str] | None = None) -> int:
    """`python -m wmtp_fn.models.meta SRC OUT`: convert once, then train from OUT."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="python -m wmtp_fn.models.meta", description="Convert Meta's MTP release (params.json + consolidated.pth) into a wmtp_fn MTP base directory.")
    parser.add_argument("src", help="directory with params.json and consolidated.pth")
    parser.add_argument("out", help="output directory (config.json + model.safetensors)")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    args = parser.parse_args(argv)
    try:
        print(convert_meta(args.src, args.out, dtype=getattr(torch, args.dtype) if args.dtype else None))
    except (FileNotFoundError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
