"""A toy LoRA-style language model for train-step tests: frozen embedding and unembedding,
trainable low-rank residual + bias, NTP loss through the chunked cross-entropy."""

import torch
import torch.nn.functional as F
from tensordict import TensorDict

from wmtp_fn.losses.ntp import ntp_count, ntp_sums_from_hidden
from wmtp_fn.objectives import Objective, weighted_sum

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


def toy_sums(params, batch, dropout: float = 0.0, chunk_size: int = 5):
    """(NTP sums [1], hidden [B, T, D]) of one batch; a ``poison`` entry multiplies the hidden."""
    h = hidden(params, batch["input_ids"], dropout)
    if batch.get("poison") is not None:
        h = h * batch["poison"]
    s, _ = ntp_sums_from_hidden(h, UNEMBED, batch["labels"], chunk_size=chunk_size)
    return s.reshape(1), h


def make_objective(dropout: float = 0.0, chunk_size: int = 5) -> Objective:
    """The toy NTP objective; metrics: ``n_seq`` (a plain sum) and ``hidden_mean`` (the sum of
    the hidden entries, divided by the named count ``n_hidden``)."""

    def loss(params, extra, batch, scale):
        sums, h = toy_sums(params, batch, dropout, chunk_size)
        metrics = {"n_seq": float(batch["input_ids"].shape[0]), "hidden_mean": h.sum(), "n_hidden": h.numel()}
        return weighted_sum(sums, scale), sums, metrics

    return Objective(count=ntp_count, loss=loss, means={"hidden_mean": "n_hidden"})


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


def init_extra() -> TensorDict:
    """The run state of ``make_stateful_objective``: an EMA of the mean hidden entry and the
    number of input tokens seen (float64, exact)."""
    return TensorDict(
        {"stats": {"ema": torch.zeros(()), "tokens_seen": torch.zeros((), dtype=torch.float64)}}, batch_size=[]
    )


def make_stateful_objective(dropout: float = 0.0, log: list | None = None) -> Objective:
    """The toy objective with a ``prepare`` that reads every micro-batch of the step (summed
    over ranks through ``comm``), updates ``extra`` and hands each micro-batch the new EMA;
    the loss depends on it, so a wrong ``extra`` changes the gradients. ``log`` records the
    order of the calls."""
    base = make_objective(dropout)

    def count(batch):
        if log is not None:
            log.append("count")
        return base.count(batch)

    def prepare(params, extra, micro_batches, comm):
        if log is not None:
            log.append(("prepare", len(micro_batches), torch.is_grad_enabled()))
        h_sum = torch.stack([hidden(params, mb["input_ids"]).sum() for mb in micro_batches]).sum()
        n = sum(mb["input_ids"].numel() * D for mb in micro_batches)
        totals = comm.sum_(torch.stack([h_sum.double(), torch.tensor(float(n), dtype=torch.float64)]))
        ema = 0.5 * extra["stats", "ema"] + 0.5 * (totals[0] / totals[1]).float()
        tokens = extra["stats", "tokens_seen"] + totals[1] / D
        new = TensorDict({"stats": {"ema": ema, "tokens_seen": tokens}}, batch_size=[])
        return new, [{**mb, "ema": ema} for mb in micro_batches]

    def loss(params, extra, batch, scale):
        if log is not None:
            log.append(("loss", "ema" in batch))
        sums, h = toy_sums(params, batch, dropout)
        sums = sums * (1.0 + extra["stats", "ema"])  # depends on the run state
        return weighted_sum(sums, scale), sums, {"n_seq": float(batch["input_ids"].shape[0])}

    return Objective(count=count, loss=loss, prepare=prepare)
