"""Pieces every pipeline composes: device, base, tokenizer, run directory, checkpoints, batches.

Each function turns one part of an ml-collections config into a plain object; a pipeline is a
short script that wires them together (see `ref_tuning.py`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from ml_collections import ConfigDict
from tensordict import TensorDict
from torch import nn

from wmtp_fn import checkpoint
from wmtp_fn.adapters import AdapterSpec, install_slots
from wmtp_fn.data.collate import collate
from wmtp_fn.data.embedded import embedded_dataset_path, embedded_tokenizer_path
from wmtp_fn.data.encode import encode_many
from wmtp_fn.data.index import Index, build_index, check_fresh, read_many, subset
from wmtp_fn.data.sampling import Cursor, next_batch, sample_by_difficulty
from wmtp_fn.data.schema import DataError
from wmtp_fn.data.split import split_problems
from wmtp_fn.models.base import build_base, load_base, tiny_llama_config
from wmtp_fn.models.layers import checkpoint_layers, compile_layers
from wmtp_fn.models.llama import right_padded
from wmtp_fn.train import adamw
from wmtp_fn.train import state as train_state
from wmtp_fn.train.schedule import ScheduleConfig

# Config keys that may change between a run and its resumption. They do not change the math,
# except train.steps, which may grow only while the schedule's horizon stays put (see
# `schedule_horizon`; the check is separate).
RESUMABLE_CHANGES = (
    "train.steps", "schedule.total_steps", "train.resume", "train.log_every", "train.eval_every",
    "train.save_every", "train.keep",
)


def schedule_horizon(flat: dict[str, Any]) -> int:
    """The step at which the learning-rate decay ends: `schedule.total_steps`, or `train.steps`
    when that is 0."""
    return int(flat.get("schedule.total_steps") or flat["train.steps"])


# ----------------------------------------------------------------------------- device, run dir


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"config.device is {name!r} but no CUDA device is available")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"config.dtype is {name!r}; expected auto, float32, bfloat16 or float16")
    return getattr(torch, name)


def flat_config(config: ConfigDict) -> dict[str, Any]:
    """`{"a.b": value}` of a config, for diffs and logs."""
    out = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, (ConfigDict, Mapping)):
            for k in node.keys():
                walk(f"{prefix}.{k}" if prefix else k, node[k])
        else:
            out[prefix] = list(node) if isinstance(node, tuple) else node

    walk("", config)
    return out


def start_run(config: ConfigDict) -> tuple[Path, Path | None]:
    """Create `out_dir`, save the resolved config, and find the checkpoint to resume from.

    With `train.resume="auto"`, an existing run in `out_dir` is continued only if its config
    matches (up to `RESUMABLE_CHANGES`); otherwise it is an error, so nothing is overwritten.
    """
    out_dir = Path(config.out_dir)
    ckpt_root = out_dir / "checkpoints"
    found = checkpoint.latest(ckpt_root) if ckpt_root.exists() else None
    if found is not None:
        if config.train.resume == "never":
            raise FileExistsError(
                f"{out_dir} already holds a run (latest checkpoint {found.name}); choose another "
                "--config.out_dir, or resume it with --config.train.resume=auto"
            )
        _, meta = checkpoint.read_checkpoint(found)
        old, new = meta.get("config", {}), flat_config(config)
        diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k) and k not in RESUMABLE_CHANGES)
        if diff:
            shown = "; ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in diff[:6])
            raise ValueError(
                f"{out_dir} holds a run with another config ({shown}); choose another --config.out_dir "
                "or use the same settings to resume"
            )
        if schedule_horizon(old) != schedule_horizon(new):
            raise ValueError(
                f"{out_dir}: resuming with train.steps={new['train.steps']} would move the learning-rate "
                f"schedule's horizon from step {schedule_horizon(old)} to {schedule_horizon(new)} mid-run; to train "
                f"further on the old schedule (its final rate from step {schedule_horizon(old)} on), add "
                f"--config.schedule.total_steps={schedule_horizon(old)}"
            )
    elif config.train.resume not in ("auto", "never"):
        raise ValueError(f"config.train.resume is {config.train.resume!r}; expected 'auto' or 'never'")
    out_dir.mkdir(parents=True, exist_ok=True)
    checkpoint.atomic_write_text(out_dir / "config.json", json.dumps(flat_config(config), indent=2, sort_keys=True) + "\n")
    return out_dir, found


# ----------------------------------------------------------------------------- base, tokenizer


def load_tokenizer(data_cfg: ConfigDict, base_path: str):
    from transformers import AutoTokenizer

    path = data_cfg.tokenizer or base_path or str(embedded_tokenizer_path())
    tok = AutoTokenizer.from_pretrained(path)
    if tok.eos_token_id is None:
        raise ValueError(f"tokenizer at {path} has no EOS token; the NTP target ends with EOS")
    if tok.pad_token_id is None:  # LLaMA tokenizers have none; padding is masked anyway
        tok.pad_token = tok.eos_token
    return tok


def load_frozen_base(
    base_cfg: ConfigDict, tokenizer, out_dir: Path, device: torch.device, dtype: torch.dtype, *, kind: str = "causal_lm"
) -> tuple[nn.Module, str]:
    """The frozen, slotted base and the path it was loaded from.

    With no `base.path`, the embedded tiny Llama (random weights, fixed seed, sized to the
    tokenizer) is written once to `out_dir/base` with `save_pretrained` and loaded from there.
    """
    path = base_cfg.path
    if not path:
        path = str(out_dir / "base")
        if not (Path(path) / "config.json").is_file():
            cfg = tiny_llama_config(
                vocab_size=len(tokenizer),
                hidden_size=base_cfg.tiny_hidden_size,
                intermediate_size=int(base_cfg.tiny_hidden_size * 8 / 3 + 63) // 64 * 64,
                num_hidden_layers=base_cfg.tiny_layers,
                num_attention_heads=max(1, base_cfg.tiny_hidden_size // 32),
                num_key_value_heads=max(1, base_cfg.tiny_hidden_size // 64),
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
            build_base(cfg, kind=kind, seed=0).save_pretrained(path)
    base = load_base(path, kind=kind, dtype=dtype, device=device)
    vocab = base.config.vocab_size
    if len(tokenizer) > vocab:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens but the base at {path} has vocab_size {vocab}")
    return base, path


def prepare_base(base: nn.Module, base_cfg: ConfigDict, targets: Sequence[str]) -> nn.Module:
    """Install slots, then the per-layer execution options (compile, activation checkpointing)."""
    install_slots(base, targets)
    if base_cfg.activation_checkpointing:
        checkpoint_layers(base)
    if base_cfg.compile:
        # Real batches vary in length (and the last of an epoch in size): compile for dynamic
        # shapes up front instead of recompiling per shape until Dynamo's limit.
        compile_layers(base, fullgraph=True, dynamic=True, memory_budget=base_cfg.activation_memory_budget)
    return base


def lora_spec(lora_cfg: ConfigDict) -> AdapterSpec:
    return AdapterSpec(
        rank=lora_cfg.rank,
        alpha=float(lora_cfg.alpha),
        dropout=float(lora_cfg.dropout),
        targets=tuple(lora_cfg.targets),
        use_rslora=lora_cfg.use_rslora,
        use_dora=lora_cfg.use_dora,
    )


def optimizer_configs(optim_cfg: ConfigDict, sched_cfg: ConfigDict, horizon: int) -> tuple[adamw.AdamWConfig, ScheduleConfig]:
    """AdamW and schedule configs; `horizon` is `schedule_horizon` of the run's config."""
    multipliers = {"lora_B": float(optim_cfg.loraplus_ratio)} if optim_cfg.loraplus_ratio != 1.0 else {}
    opt = adamw.AdamWConfig(
        lr=float(optim_cfg.lr),
        betas=tuple(optim_cfg.betas),
        eps=float(optim_cfg.eps),
        weight_decay=float(optim_cfg.weight_decay),
        lr_multipliers=multipliers,
        max_grad_norm=optim_cfg.max_grad_norm,
    )
    sched = ScheduleConfig(
        kind=sched_cfg.kind,
        warmup_steps=min(sched_cfg.warmup_steps, max(horizon - 1, 0)),
        total_steps=horizon,
        min_lr_ratio=float(sched_cfg.min_lr_ratio),
    )
    return opt, sched


# ----------------------------------------------------------------------------- train checkpoints


def save_train(
    root: Path,
    state: train_state.TrainState,
    cursor: Cursor,
    *,
    specs: Mapping[str, AdapterSpec],
    config: ConfigDict,
    info: Mapping[str, Any],
    keep: int,
) -> Path:
    """A resumable checkpoint: params, optimizer moments, step, seed, data cursor, config."""
    tensors, meta = train_state.to_flat(state)
    params = {k.removeprefix("params."): v for k, v in tensors.items() if k.startswith("params.")}
    opt = {k: v for k, v in tensors.items() if not k.startswith("params.")}
    body = {
        "kind": "train",
        "state": meta,
        "cursor": cursor.to_dict(),
        "config": flat_config(config),
        "metrics": dict(info),
        **checkpoint.adapter_meta(specs),
    }
    return checkpoint.save_step(root, state.step, {"params": params, "opt": opt}, body, keep=keep)


def restore_train(path: Path, device: torch.device) -> tuple[train_state.TrainState, Cursor, dict[str, Any]]:
    tensors, meta = checkpoint.read_checkpoint(path)
    flat = {f"params.{k}": v.to(device) for k, v in tensors["params"].items()}
    flat.update({k: v.to(device) for k, v in tensors["opt"].items()})
    return train_state.from_flat(flat, meta["state"]), Cursor.from_dict(meta["cursor"]), meta


# ----------------------------------------------------------------------------- record batches


@dataclass(frozen=True)
class RecordSet:
    """Sampled records of one indexed JSONL file, read by offset when a batch needs them."""

    index: Index
    offsets: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.offsets)


def ntp_record_sets(data_cfg: ConfigDict, seed: int) -> tuple[RecordSet, RecordSet]:
    """Train and validation records by difficulty sampling (REFERENCE.md §Data)."""
    train_path = data_cfg.train_path or str(embedded_dataset_path())
    index = build_index(train_path)
    if data_cfg.val_path:
        train_index, val_index = index, build_index(data_cfg.val_path)
    else:
        train_ids, val_ids = split_problems(index, data_cfg.val_fraction, seed)
        train_index, val_index = subset(index, train_ids), subset(index, val_ids)
    bins, weights = dict(data_cfg.difficulty_bins), dict(data_cfg.difficulty_weights)
    ratio = float(data_cfg.correct_ratio)

    def draw(idx: Index, n: int) -> RecordSet:
        available = _count_in_bins(idx, bins, correct=ratio >= 1.0)
        n = min(n, available) if n else available
        if n == 0:
            raise ValueError(f"{idx['path']}: no records in difficulty bins {bins} to sample from")
        offsets = sample_by_difficulty(idx, n_samples=n, seed=seed, bins=bins, weights=weights, correct_ratio=ratio)
        return RecordSet(idx, tuple(offsets))

    return draw(train_index, data_cfg.n_samples), draw(val_index, data_cfg.val_n_samples)


def _count_in_bins(index: Index, bins: Mapping[str, Sequence[int]], *, correct: bool) -> int:
    total = 0
    for entry in index["problems"].values():
        if any(lo <= entry["difficulty"] <= hi for lo, hi in bins.values()):
            total += len(entry["correct_offsets"]) + (0 if correct else len(entry["incorrect_offsets"]))
    return total


def encoded_batches(
    records: RecordSet, items: Sequence[int], tokenizer, data_cfg: ConfigDict, *, micro_batch_size: int, skipped: list
) -> list[dict[str, torch.Tensor]]:
    """Read, tokenise and collate `items` of `records` into micro-batches (CPU tensors)."""
    check_fresh(records.index)  # the offsets belong to the file as it was indexed
    recs = read_many(records.index["path"], [records.offsets[i] for i in items])
    examples = encode_many(
        recs,
        tokenizer,
        max_length=data_cfg.max_length,
        use_chat_template=data_cfg.use_chat_template,
        on_error=data_cfg.too_long,
        skipped=skipped,
    )
    return [
        collate(
            examples[i : i + micro_batch_size],
            pad_id=tokenizer.pad_token_id,
            pad_to_multiple_of=data_cfg.pad_to_multiple_of or None,
        )
        for i in range(0, len(examples), micro_batch_size)
    ]


def batch_stream(
    records: RecordSet, tokenizer, data_cfg: ConfigDict, *, batch_size: int, micro_batch_size: int, device: torch.device, skipped: list
) -> Callable[[Cursor], tuple[list[dict[str, torch.Tensor]], Cursor]]:
    """`next_batch(cursor) -> (micro_batches on device, cursor)`: seeded, epoch-permuted, resumable.

    Batches whose every record is skipped as too long are passed over; once every record has
    been tried without one that fits, that is a `DataError` (the stream would never yield)."""

    def next_(cursor: Cursor):
        tried: set[int] = set()
        while True:
            items, cursor = next_batch(len(records), batch_size, cursor)
            mbs = encoded_batches(records, items, tokenizer, data_cfg, micro_batch_size=micro_batch_size, skipped=skipped)
            if mbs:  # every record of the batch may have been skipped as too long
                return [to_device(mb, device) for mb in mbs], cursor
            tried.update(items)
            if len(tried) == len(records):
                raise DataError(
                    records.index["path"],
                    f"none of the {len(records)} records sampled for training fits max_length={data_cfg.max_length} "
                    "(every prompt leaves no room for a response token); raise data.max_length",
                )

    return next_


def to_device(batch: Mapping[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """Move a CPU batch. A mask of an unpadded or right-padded batch is dropped (decided on the
    CPU, no sync): causal attention never looks right, so the loss is unchanged, and attention
    takes its unmasked causal kernel."""
    out = {k: v.to(device, non_blocking=True) for k, v in batch.items() if k != "attention_mask"}
    mask = batch.get("attention_mask")
    if mask is not None and not right_padded(mask):
        out["attention_mask"] = mask.to(device, non_blocking=True)
    return out


def mean_loss(loss_fn: Callable, count_fn: Callable, params: TensorDict, batches: Sequence[Mapping[str, torch.Tensor]]) -> float:
    """Σ sums / Σ counts over `batches` without gradients (one sync at the end)."""
    total = count = None
    with torch.no_grad():
        for batch in batches:
            sums, _ = loss_fn(params, batch)
            n = count_fn(batch)
            total = sums if total is None else total + sums
            count = n if count is None else count + n
    return float((total / count.clamp_min(1)).mean()) if total is not None else float("nan")
