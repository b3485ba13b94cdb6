"""Meta's multi-token-prediction Llama (Gloeckle et al. 2024) built from HuggingFace Llama parts.

    z      = layers[:-1](embed(x))                     the shared trunk
    head 0 = layers[-1](z),  head j >= 1 = extra_heads[j-1](z)    every head reads the same z
    logits_k = lm_head(norm(head_k))                    shared final norm and unembedding

Head k (0-based) at position t predicts token t + k + 1; head 0 alone is plain next-token
prediction (generation uses it). `layers` holds `n_layers - n_future + 1` blocks, `extra_heads`
`n_future - 1`, as in Meta's release. The module paths are those of a `LlamaForCausalLM` plus
`extra_heads.{j}` (`model.layers.3.self_attn.q_proj`, `extra_heads.0.mlp.down_proj`), so slots,
adapters and checkpoints treat it like any Llama base. The value-head input is `norm(z)`.

RoPE: HF's rotate-half layout (Meta's adjacent-pair layout is converted by permuting q/k rows,
see `meta.py`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaModel

ARCHITECTURE = "WmtpMTPLlama"  # config.json `architectures[0]` of a saved MTP base


def mtp_config(n_future: int, **llama_kwargs) -> LlamaConfig:
    """A `LlamaConfig` for an MTP base: `num_hidden_layers` counts trunk + head 0 + extra heads
    (Meta's `n_layers`); `n_future` is stored in the config."""
    if type(n_future) is not int or n_future < 1:
        raise ValueError(f"n_future must be an int >= 1, got {n_future!r}")
    cfg = LlamaConfig(**llama_kwargs)
    if cfg.num_hidden_layers < n_future:
        raise ValueError(f"num_hidden_layers={cfg.num_hidden_layers} must be >= n_future={n_future} (a trunk of >= 0 layers)")
    cfg.n_future = n_future
    cfg.architectures = [ARCHITECTURE]
    return cfg


@dataclass(frozen=True)
class TrunkOutput:
    """What every head needs: the trunk output and the per-call attention inputs."""

    hidden: torch.Tensor  # z: [B, T, d]
    rope: tuple[torch.Tensor, torch.Tensor]
    mask: torch.Tensor | None
    positions: torch.Tensor  # [1, T]


class MTPLlama(nn.Module):
    """The MTP base (see the module docstring). `forward(input_ids) -> logits [B, T, H, V]` for
    small inputs and notebooks; training runs the trunk once and the heads one at a time
    (`trunk`, `head_hidden`), so `[B, T, H, V]` logits are never held."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        n_future = getattr(config, "n_future", None)
        if not isinstance(n_future, int) or n_future < 1:
            raise ValueError("an MTP base config needs `n_future` >= 1 (see mtp_config)")
        self.config = config
        self.n_future = n_future
        trunk_cfg = LlamaConfig.from_dict({**config.to_dict(), "num_hidden_layers": config.num_hidden_layers - n_future + 1})
        trunk_cfg._attn_implementation = config._attn_implementation
        self.model = LlamaModel(trunk_cfg)  # embed_tokens, rotary_emb, layers (trunk + head 0), norm
        first = trunk_cfg.num_hidden_layers
        self.extra_heads = nn.ModuleList(LlamaDecoderLayer(trunk_cfg, layer_idx=first + j) for j in range(n_future - 1))
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def head_layers(self) -> list[nn.Module]:
        """The decoder layer of each head, head 0 first."""
        return [self.model.layers[-1], *self.extra_heads]

    def trunk(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> TrunkOutput:
        """Embed and run `layers[:-1]`. input_ids: [B, T] -> z: [B, T, d]."""
        from wmtp_fn.models.llama import embed, run_layers

        hidden, rope, mask, positions = embed(self.model, input_ids, attention_mask)
        hidden = run_layers(list(self.model.layers)[:-1], hidden, rope, mask, positions)
        return TrunkOutput(hidden, rope, mask, positions)

    def head_hidden(self, trunk: TrunkOutput, k: int, z: torch.Tensor | None = None) -> torch.Tensor:
        """Normalised hidden state of head `k` (0-based): `norm(head_k(z))`, [B, T, d]. `z`
        overrides `trunk.hidden` (e.g. a detached copy for a per-head backward)."""
        from wmtp_fn.models.llama import run_layers

        layer = self.head_layers()[k]
        h = run_layers([layer], trunk.hidden if z is None else z, trunk.rope, trunk.mask, trunk.positions)
        return self.model.norm(h)

    def value_input(self, trunk: TrunkOutput) -> torch.Tensor:
        """The value head's input on an MTP base: `norm(z)`, [B, T, d]."""
        return self.model.norm(trunk.hidden)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *, then=None):
        """All-head logits `[B, T, H, V]` (holds them all: small inputs only).

        then: `then(model, trunk_output) -> anything` replaces the heads: it runs inside this
        call, so an adapter bound for the call (`adapters.apply`) stays bound while it runs the
        heads its own way (one at a time, each with its own backward)."""
        t = self.trunk(input_ids, attention_mask)
        if then is not None:
            return then(self, t)
        return torch.stack([self.lm_head(self.head_hidden(t, k)) for k in range(self.n_future)], dim=2)


def mtp_from_llama(llama: nn.Module, n_future: int) -> MTPLlama:
    """An MTP base from a `LlamaForCausalLM`: the same trunk, embeddings, norm and unembedding;
    head 0 is the last decoder layer, and each extra head starts as a copy of it.

    Why copies of the last layer: every head then starts as the pretrained next-token
    predictor (head k > 0 predicts token t+k+1 with the t+1 predictor's weights, a sensible
    start that fine-tuning specialises); the layer count of the trunk is unchanged, so no
    pretrained computation is lost. Weights are copied, the source model is left intact.
    """
    cfg = llama.config
    mtp_cfg = mtp_config(n_future, **{**cfg.to_dict(), "num_hidden_layers": cfg.num_hidden_layers + n_future - 1})
    mtp_cfg._attn_implementation = cfg._attn_implementation
    mtp_cfg.tie_word_embeddings = False  # the MTP base has its own (frozen) copy of the unembedding
    with torch.device("meta"):
        model = MTPLlama(mtp_cfg)
    state = dict(llama.state_dict())
    if "lm_head.weight" not in state:  # tied embeddings
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    last = cfg.num_hidden_layers - 1
    for name, t in list(state.items()):
        prefix = f"model.layers.{last}."
        if name.startswith(prefix):
            for j in range(n_future - 1):
                state[f"extra_heads.{j}." + name[len(prefix):]] = t
    model.load_state_dict({k: v.detach().clone() for k, v in state.items()}, strict=True, assign=True)
    _fresh_rotary(model, state["lm_head.weight"].device)
    return model.to(state["lm_head.weight"].dtype)


def _fresh_rotary(model: MTPLlama, device) -> None:
    """Rebuild the rotary embedding (its frequencies are a non-persistent buffer, absent from
    state dicts) on `device` after a meta-device construction."""
    with torch.device(device):
        model.model.rotary_emb = type(model.model.rotary_emb)(model.model.config)


def save_mtp(model: MTPLlama, path) -> None:
    """Write an MTP base as a directory (`config.json` + `model.safetensors`), atomically."""
    from pathlib import Path

    from safetensors.torch import save_file

    from wmtp_fn.atomic import atomic_dir

    with atomic_dir(Path(path)) as tmp:
        model.config.to_json_file(str(tmp / "config.json"))
        save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, str(tmp / "model.safetensors"))


def is_mtp_config(config: dict) -> bool:
    """Whether a parsed config.json describes an MTP base."""
    return ARCHITECTURE in (config.get("architectures") or []) and isinstance(config.get("n_future"), int)


def load_mtp(path, *, dtype: torch.dtype = torch.float32, device="cpu", attn_implementation: str | None = "sdpa") -> MTPLlama:
    """Load an MTP base directory written by `save_mtp` (strict: every tensor present)."""
    from pathlib import Path

    from safetensors.torch import load_file

    path = Path(path)
    config = LlamaConfig.from_pretrained(str(path))
    if attn_implementation:
        config._attn_implementation = attn_implementation
    with torch.device("meta"):
        model = MTPLlama(config)
    state = load_file(str(path / "model.safetensors"), device=str(device))
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True, assign=True)
    _fresh_rotary(model, device)
    return model
