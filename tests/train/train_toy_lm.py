"""A toy LoRA-style language model for train-step tests: frozen embedding and unembedding,
trainable low-rank residual + bias, NTP loss through the chunked cross-entropy."""

import torch
import torch.nn.functional as F
from tensordict import TensorDict

from wmtp_fn.losses.ntp import ntp_count, ntp_sums_from_hidden

V, D, R = 23, 12, 4
_g = torch.Generator().manual_seed(1234)
EMBED = torch.randn(V, D, generator=_g)
UNEMBED = torch.randn(V, D, generator=_g) / D**0.5


def init_params(seed: int = 0) -> TensorDict:
    g = torch.Generator().manual_seed(seed)
    td = TensorDict({}, batch_size=[])
    td.set(("lora", "proj", "lora_A"), 0.3 * torch.randn(R, D, generator=g))
    td.set(("lora", "proj", "lora_B"), 0.3 * torch.randn(D, R, generator=g))
    td.set(("head", "bias"), 0.1 * torch.randn(D, generator=g))
    td.set(("head", "scale"), 1.0 + 0.1 * torch.randn(D, generator=g))
    return td


def hidden(params: TensorDict, ids: torch.Tensor, dropout: float = 0.0) -> torch.Tensor:
    """ids: [B, T] -> hidden: [B, T, D]."""
    x = EMBED[ids]
    x_lora = F.dropout(x, p=dropout, training=dropout > 0)  # dropout on the LoRA input only
    delta = x_lora @ params["lora", "proj", "lora_A"].T @ params["lora", "proj", "lora_B"].T
    h = torch.tanh(x + delta + params["head", "bias"]) * params["head", "scale"]
    # A causal-ish mix so positions interact (prefix mean).
    return torch.cumsum(h, dim=1) / torch.arange(1, ids.shape[1] + 1)[None, :, None]


def make_loss_fn(dropout: float = 0.0, chunk_size: int = 5):
    def loss_fn(params, batch):
        h = hidden(params, batch["input_ids"], dropout)
        if batch.get("poison") is not None:
            h = h * batch["poison"]
        s, c = ntp_sums_from_hidden(h, UNEMBED, batch["labels"], chunk_size=chunk_size)
        return s.reshape(1), {"n_seq": float(batch["input_ids"].shape[0]), "hidden_mean": h.mean()}

    return loss_fn


count_fn = ntp_count


def make_batch(n_seq: int, T: int = 9, seed: int = 0, prompt_max: int = 6) -> dict:
    """Sequences with varying prompt (-100) and padding (-100) lengths, so token counts differ."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (n_seq, T), generator=g)
    labels = ids.clone()
    for b in range(n_seq):
        p = int(torch.randint(0, prompt_max, (), generator=g))
        length = int(torch.randint(p + 1, T + 1, (), generator=g))
        labels[b, :p] = -100
        labels[b, length:] = -100
    return {"input_ids": ids, "labels": labels}


def concat(batches: list[dict]) -> dict:
    return {k: torch.cat([b[k] for b in batches]) for k in ("input_ids", "labels")}
