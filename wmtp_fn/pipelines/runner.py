"""The run wiring every pipeline shares, written once.

A pipeline states only what is its own (`Recipe`: the trainable params and their specs, the
train and validation objectives, the initial extra state, which adapter to export); everything
else lives here, in this order:

    open_session: validate every input (device, batch sizes, base directory, tokenizer, data:
                  the record stream, or the pipeline's own `Stream`) -> only then write the
                  run directory -> load the base -> models.prepare
    run_recipe:   resume or start the state -> stream batches -> fit (loop, checkpoints,
                  validation) -> export the adapter -> one summary line
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from ml_collections import ConfigDict
from tensordict import TensorDict

from wmtp_fn import checkpoint
from wmtp_fn.adapters import AdapterSpec, export_peft
from wmtp_fn.adapters.nf4 import check_quant_type
from wmtp_fn.adapters.seeds_io import save_hf_lora
from wmtp_fn.atomic import atomic_dir, atomic_write_text
from wmtp_fn.config import flat_config
from wmtp_fn.data.embedded import embedded_tokenizer_path
from wmtp_fn.data.sampling import Cursor
from wmtp_fn.data.stream import RecordSet, batch_stream, encoded_batches, record_sets, to_device
from wmtp_fn.dist.comm import LOCAL, Comm, barrier, launched, process_comm, replicas_checked
from wmtp_fn.dist.sampler import check_even, sharded_stream
from wmtp_fn.errors import CheckpointError, ConfigError
from wmtp_fn.fingerprint import check_same_base
from wmtp_fn.models.base import Base, check_base_dir, embedded_base_dir, open_base
from wmtp_fn.models.prepare import prepare
from wmtp_fn.objectives import Objective
from wmtp_fn.train import adamw
from wmtp_fn.train.evaluate import evaluate
from wmtp_fn.train.loop import LoopConfig, MetricsLog, NullLog, fit
from wmtp_fn.schedule import ScheduleConfig
from wmtp_fn.train.state import init_train_state
from wmtp_fn.train.step import make_train_step

# Config keys that may change between a run and its resumption. They do not change the math,
# except train.steps, which may grow only while the schedule's horizon stays put (see
# `schedule_horizon`; the check is separate). out_dir: a run directory may be moved.
RESUMABLE_CHANGES = (
    "out_dir", "train.steps", "schedule.total_steps", "train.resume", "train.log_every", "train.eval_every",
    "train.save_every", "train.keep", "dist.shard", "dist.reshard_after_forward", "dist.check_every",
)


# ----------------------------------------------------------------------------- config pieces


def schedule_horizon(flat: Mapping[str, Any]) -> int:
    """The step at which the learning-rate decay ends: `schedule.total_steps`, or `train.steps`
    when that is 0."""
    return int(flat.get("schedule.total_steps") or flat["train.steps"])


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device is {name!r} but no CUDA device is available")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in ("float32", "bfloat16", "float16"):
        raise ConfigError(f"dtype is {name!r}; expected auto, float32, bfloat16 or float16")
    return getattr(torch, name)


def lora_spec(lora_cfg: ConfigDict) -> AdapterSpec:
    return AdapterSpec(
        rank=lora_cfg.rank, alpha=float(lora_cfg.alpha), dropout=float(lora_cfg.dropout),
        targets=tuple(lora_cfg.targets), use_rslora=lora_cfg.use_rslora, use_dora=lora_cfg.use_dora,
    )


def optimizer_configs(
    optim_cfg: ConfigDict, sched_cfg: ConfigDict, horizon: int, lr_multipliers: Mapping[str, float] | None = None
) -> tuple[adamw.AdamWConfig, ScheduleConfig]:
    """AdamW and schedule configs; `horizon` is `schedule_horizon` of the run's config;
    `lr_multipliers` (leaf patterns, `adamw.AdamWConfig`) join LoRA+'s `lora_B` ratio."""
    multipliers = {"lora_B": float(optim_cfg.loraplus_ratio)} if optim_cfg.loraplus_ratio != 1.0 else {}
    multipliers.update(lr_multipliers or {})
    opt = adamw.AdamWConfig(
        lr=float(optim_cfg.lr), betas=tuple(optim_cfg.betas), eps=float(optim_cfg.eps),
        weight_decay=float(optim_cfg.weight_decay), lr_multipliers=multipliers, max_grad_norm=optim_cfg.max_grad_norm,
    )
    sched = ScheduleConfig(
        kind=sched_cfg.kind, warmup_steps=min(sched_cfg.warmup_steps, max(horizon - 1, 0)),
        total_steps=horizon, min_lr_ratio=float(sched_cfg.min_lr_ratio),
    )
    return opt, sched


def load_tokenizer(data_cfg: ConfigDict, base_path: str):
    from transformers import AutoTokenizer

    key = "data.tokenizer" if data_cfg.tokenizer else "base.path"
    path = data_cfg.tokenizer or base_path or str(embedded_tokenizer_path())
    if not Path(path).is_dir():
        raise ConfigError(f"{key}: {path!r} is not a directory (expected a tokenizer or HuggingFace model directory)")
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{key}: cannot load a tokenizer from {path!r} ({str(e).splitlines()[0]})") from e
    if tok.eos_token_id is None:
        raise ConfigError(f"{key}: the tokenizer at {path!r} has no EOS token; the NTP target ends with EOS")
    if tok.pad_token_id is None:  # LLaMA tokenizers have none; padding is masked anyway
        tok.pad_token = tok.eos_token
    return tok


# ----------------------------------------------------------------------------- run directory


def resume_point(config: ConfigDict) -> Path | None:
    """The latest checkpoint of the run in `out_dir` if this config may continue it, None for a
    new run; a `ConfigError` if `out_dir` holds a run this config must not touch. Reads only."""
    if config.train.resume not in ("auto", "never"):
        raise ConfigError(f"train.resume is {config.train.resume!r}; expected 'auto' or 'never'")
    out_dir = Path(config.out_dir)
    ckpt_root = out_dir / "checkpoints"
    found = checkpoint.latest(ckpt_root) if ckpt_root.exists() else None
    if found is None:
        return None
    if config.train.resume == "never":
        raise ConfigError(
            f"{out_dir} already holds a run (latest checkpoint {found.name}); choose another "
            "--config.out_dir, or resume it with --config.train.resume=auto"
        )
    _, meta = checkpoint.read_checkpoint(found)
    old, new = meta.get("config", {}), flat_config(config)
    diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k) and k not in RESUMABLE_CHANGES)
    if diff:
        shown = "; ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in diff[:6])
        raise ConfigError(
            f"{out_dir} holds a run with another config ({shown}); choose another --config.out_dir "
            "or use the same settings to resume"
        )
    if schedule_horizon(old) != schedule_horizon(new):
        raise ConfigError(
            f"{out_dir}: resuming with train.steps={new['train.steps']} would move the learning-rate "
            f"schedule's horizon from step {schedule_horizon(old)} to {schedule_horizon(new)} mid-run; to train "
            f"further on the old schedule (its final rate from step {schedule_horizon(old)} on), add "
            f"--config.schedule.total_steps={schedule_horizon(old)}"
        )
    return found


def start_run(config: ConfigDict) -> tuple[Path, Path | None]:
    """Find the checkpoint to resume from, then create `out_dir` and save the resolved config.
    Call it after the inputs are validated: it is the first thing that writes."""
    found = resume_point(config)
    out_dir = Path(config.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "config.json", json.dumps(flat_config(config), indent=2, sort_keys=True) + "\n")
    return out_dir, found


# ----------------------------------------------------------------------------- session


@dataclass(frozen=True)
class Stream:
    """A run's data. `next_batch(cursor) -> (micro-batches on the device, cursor)` walks
    `n_train` items (`data.sampling.Cursor` positions) from `Cursor(seed=config.seed)`, a pure
    function of the cursor, which the checkpoints save; `val_batches` are fixed; `summary`
    names both for the run's first line ("720 train / 80 val records")."""

    next_batch: Callable[[Cursor], tuple[list[Any], Cursor]]
    n_train: int
    val_batches: list[Any]
    summary: str


DataFn = Callable[[ConfigDict, Any, torch.device], Stream]
"""`data(config, tokenizer, device) -> Stream`: a pipeline's own data, e.g. critic pairs."""


def record_stream(config: ConfigDict, tokenizer, device: torch.device) -> tuple[Stream, RecordSet, RecordSet]:
    """The default data: records by difficulty sampling (`data.stream`), validation records
    encoded once; also the two record sets."""
    train_set, val_set = record_sets(config.data, config.seed)
    val_cpu, skipped = encoded_batches(val_set, range(len(val_set)), tokenizer, config.data,
                                       micro_batch_size=config.train.micro_batch_size)
    if skipped:
        print(f"warning: {len(skipped)} validation record(s) skipped as too long, e.g. {skipped[0]}")
    next_batch = batch_stream(train_set, tokenizer, config.data, batch_size=config.train.batch_size,
                              micro_batch_size=config.train.micro_batch_size, device=device)
    stream = Stream(next_batch, len(train_set), [to_device(mb, device) for mb in val_cpu],
                    f"{len(train_set)} train / {len(val_set)} val records")
    return stream, train_set, val_set


@dataclass(frozen=True)
class Session:
    """Everything a run has once its inputs are validated and its base is ready. `train_set`
    and `val_set` are the record sets of the default data (None with a pipeline's own)."""

    config: ConfigDict
    out_dir: Path
    device: torch.device
    dtype: torch.dtype
    tokenizer: Any
    stream: Stream
    base: Base
    resume_from: Path | None
    train_set: RecordSet | None = None
    val_set: RecordSet | None = None
    comm: Comm = LOCAL  # the process group (`dist.comm`); rank 0 alone writes

    @property
    def val_batches(self) -> list[Any]:
        return self.stream.val_batches


def open_session(
    config: ConfigDict, *, to_base: Callable[[Base], Base] | None = None, data: DataFn | None = None
) -> Session:
    """Validate the inputs, then write the run directory, load the base (the embedded tiny Llama
    when `base.path` is empty), let `to_base` reshape it (e.g. a Llama turned into an MTP base),
    and prepare it (slots, checkpointing, compile, and under torchrun the `dist.shard`
    sharding) for `lora.targets`. `data` replaces the record stream with the pipeline's own; it
    runs before anything is written, so its errors leave no run directory behind.

    Under torchrun every rank validates and reads the same inputs, rank 0 alone writes the run
    directory (the others wait for it), and each rank's stream keeps its share of every step's
    micro-batches (`dist.sampler`)."""
    comm, device = process_comm(resolve_device(config.device))
    dtype = resolve_dtype(config.dtype, device)
    if config.train.batch_size % config.train.micro_batch_size:
        raise ConfigError(
            f"train.batch_size={config.train.batch_size} is not a multiple of "
            f"train.micro_batch_size={config.train.micro_batch_size}"
        )
    quantize = check_quant_type(config.base.get("quantize", ""))
    if config.base.path:
        check_base_dir(config.base.path, key="base.path")
    tokenizer = load_tokenizer(config.data, config.base.path)
    if data is None:
        stream, train_set, val_set = record_stream(config, tokenizer, device)
    else:
        stream, train_set, val_set = data(config, tokenizer, device), None, None
    if comm.world_size > 1:
        check_even(stream.n_train, config.train.batch_size, config.train.micro_batch_size, comm.world_size)
        stream = replace(stream, next_batch=sharded_stream(stream.next_batch, comm.rank, comm.world_size))
    resume_from = resume_point(config)  # every rank: the same answer (or the same error)
    out_dir = Path(config.out_dir)

    def base_path():  # the embedded base is written on the first call
        return config.base.path or embedded_base_dir(out_dir, tokenizer, hidden_size=config.base.tiny_hidden_size,
                                                     layers=config.base.tiny_layers)

    if comm.rank == 0:
        out_dir, resume_from = start_run(config)
        base_path()
    barrier(comm, device)  # the run directory (and the embedded base) exist for every rank
    path = base_path()
    base = open_base(path, dtype=dtype, device=device)
    if to_base is not None:
        base = to_base(base)
    vocab = base.module.config.vocab_size
    if len(tokenizer) > vocab:
        raise ConfigError(f"the tokenizer has {len(tokenizer)} tokens but the base at {path} has vocab_size {vocab}")
    base = prepare(base, targets=tuple(config.lora.targets), activation_checkpointing=config.base.activation_checkpointing,
                   compile=config.base.compile, memory_budget=config.base.activation_memory_budget,
                   quantize=quantize, shard=config.dist.shard if launched() else None,
                   reshard_after_forward=config.dist.reshard_after_forward)
    return Session(config, out_dir, device, dtype, tokenizer, stream, base, resume_from, train_set, val_set, comm)


# ----------------------------------------------------------------------------- recipe


@dataclass(frozen=True)
class Recipe:
    """What a pipeline states: the initial trainable pytree and the spec of each subtree, the
    objectives, the initial `extra`, and which adapter subtree the exports write.

    export: the adapter subtree of the seeds' and PEFT exports (None: only `adapter/`, which
        always holds every subtree). value_head: a value-head subtree written into the seeds'
        hf_lora file as `value_head_state_dict` (the seeds' key names); a recipe with one
        writes hf_lora on an MTP base too (the seeds' policy file is for policies).
    lr_multipliers: leaf pattern -> learning-rate multiplier (`{"value_head.*": 5.0}`).
    val_metrics: `params -> {name: float}`, validation metrics that are not sums over
        micro-batches (AUC), logged as `val_<name>` beside the objective's.
    """

    name: str
    params: TensorDict
    specs: Mapping[str, Any]
    train: Objective
    eval: Objective
    export: str | None
    extra: TensorDict = field(default_factory=lambda: TensorDict({}, batch_size=[]))
    value_head: str | None = None
    lr_multipliers: Mapping[str, float] = field(default_factory=dict)
    val_metrics: Callable[[TensorDict], Mapping[str, float]] | None = None


@dataclass
class Result:
    out_dir: Path
    adapter_dir: Path
    first_val_loss: float
    final_val_loss: float
    steps: int


def run_recipe(session: Session, recipe: Recipe) -> Result:
    """Resume or start, train to `train.steps`, export, and print one summary line."""
    config, out_dir, device, comm = session.config, session.out_dir, session.device, session.comm
    lead = comm.rank == 0  # the one rank that prints, logs, saves and exports
    say = print if lead else (lambda *a, **k: None)
    total_steps = config.train.steps
    horizon = schedule_horizon(flat_config(config))
    opt_cfg, sched_cfg = optimizer_configs(config.optim, config.schedule, horizon, recipe.lr_multipliers)
    if session.resume_from is not None:
        state, cursor, meta = checkpoint.restore_run(session.resume_from, device)
        saved = checkpoint.specs_from_meta(meta, str(session.resume_from))
        for name, spec in recipe.specs.items():
            if isinstance(spec, AdapterSpec):
                if name not in saved:
                    raise CheckpointError(f"checkpoint {session.resume_from} has no subtree {name!r}")
                check_same_base(saved[name].base_fingerprint, spec.base_fingerprint, what=f"checkpoint {session.resume_from}")
        if state.step >= total_steps:
            metrics = meta.get("metrics", {})
            if lead and not _exports_current(out_dir, config, recipe, state.step):  # the run died after its last checkpoint
                _export(session, recipe, state, cursor, metrics)
            barrier(comm, device)
            say(f"{out_dir} is already complete ({state.step}/{total_steps} steps; adapter in {out_dir / 'adapter'}); "
                  f"to train further, raise --config.train.steps (and keep --config.schedule.total_steps={horizon})")
            last = metrics.get("val_loss")
            return Result(out_dir, out_dir / "adapter", float("nan"), float("nan") if last is None else last, state.step)
        say(f"resuming {out_dir} from {session.resume_from.name} (step {state.step})")
    else:
        state = init_train_state(recipe.params, opt_cfg, seed=config.seed, extra=recipe.extra)
        cursor = Cursor(seed=config.seed)

    step_fn = make_train_step(recipe.train, opt_cfg, sched_cfg, comm=comm, nonfinite=config.train.nonfinite)
    step_fn = replicas_checked(step_fn, comm, config.dist.check_every)
    flat = flat_config(config)

    def save(st, cur, info):
        if lead:
            checkpoint.save_run(out_dir / "checkpoints", st, cur, specs=recipe.specs, config=flat, info=info, keep=config.train.keep)

    def validate(st) -> dict[str, float]:
        got = evaluate(recipe.eval, st.params, st.extra, session.stream.val_batches)
        more = recipe.val_metrics(st.params) if recipe.val_metrics is not None else {}
        return {"val_loss": got.pop("loss"), **{f"val_{k}": v for k, v in {**got, **more}.items() if k != "n_tokens"}}

    module = session.base.module
    say(
        f"{recipe.name}: base {session.base.path} ({sum(p.numel() for p in module.parameters()):,} frozen params, "
        f"{session.dtype}, {device}); trainable {', '.join(recipe.specs)} "
        f"({sum(t.numel() for t in state.params.values(True, True)):,} params); "
        f"{session.stream.summary}" + (f"; {comm.world_size} ranks" if comm.world_size > 1 else "")
    )
    state, cursor, hist = fit(
        state, cursor, step_fn=step_fn, next_batch=session.stream.next_batch, evaluate=validate, save=save,
        cfg=LoopConfig(total_steps=total_steps, log_every=config.train.log_every,
                       eval_every=config.train.eval_every, save_every=config.train.save_every),
        log=MetricsLog(out_dir / "metrics.jsonl") if lead else NullLog(), desc=recipe.name, quiet=not lead,
    )
    final = {"val_loss": hist.val_loss[-1][1] if hist.val_loss else None,
             "train_loss": hist.train_loss[-1][1] if hist.train_loss else None}
    adapter_dir = _export(session, recipe, state, cursor, final) if lead else out_dir / "adapter"
    barrier(comm, device)  # every rank returns once the exports exist
    first = hist.val_loss[0][1] if hist.val_loss else float("nan")
    last = final["val_loss"] if final["val_loss"] is not None else float("nan")
    say(
        f"{recipe.name} done: step {state.step}/{total_steps}, val_loss {first:.4f} -> {last:.4f}, "
        f"{hist.tokens:,} tokens in {hist.seconds:.1f}s{f' since step {hist.start_step}' if hist.start_step else ''} "
        f"({hist.tokens / max(hist.seconds, 1e-9):,.0f} tok/s), {hist.skipped} skipped steps; adapter -> {adapter_dir}"
    )
    return Result(out_dir, adapter_dir, first, last, state.step)


# ----------------------------------------------------------------------------- exports


def _export(session: Session, recipe: Recipe, state, cursor: Cursor, metrics: Mapping[str, Any]) -> Path:
    """The adapter-only checkpoint (every trainable subtree), then the formats the config asks
    for, of the `recipe.export` adapter: the seeds' hf_lora (a causal LM, or any value model,
    with its `recipe.value_head`) or policy (an MTP base) file, and a PEFT directory (a causal
    LM). Each is written atomically."""
    config, out_dir, base = session.config, session.out_dir, session.base
    flat = flat_config(config)
    adapter_dir = out_dir / "adapter"
    meta = {"config": flat, "metrics": dict(metrics), "base_model_path": base.path, "step": state.step}
    checkpoint.save_params(adapter_dir, state.params, recipe.specs, meta=meta)
    if recipe.export is None:
        return adapter_dir
    adapter, spec = state.params[recipe.export], recipe.specs[recipe.export]
    epoch = cursor.epoch + cursor.position / session.stream.n_train
    seeds_meta = dict(epoch=epoch, train_metrics={"loss": metrics.get("train_loss")},
                      val_metrics={"loss": metrics.get("val_loss")}, config=flat)
    if config.export.hf_lora and base.kind == "mtp" and recipe.value_head is None:
        from wmtp_fn.adapters.lora import to_flat
        from wmtp_fn.models.meta import save_seeds_policy

        save_seeds_policy(out_dir / "adapter.seeds_lora.pt", to_flat(adapter), spec, base.module.config, **seeds_meta)
    elif config.export.hf_lora:
        head = None
        if recipe.value_head is not None:
            from wmtp_fn.models.value_head import to_seeds_state

            head = to_seeds_state(state.params[recipe.value_head], recipe.specs[recipe.value_head].kind)
        save_hf_lora(out_dir / "adapter.hf_lora.pt", adapter, spec, value_head=head, base_model_path=base.path or "",
                     **seeds_meta)
    if config.export.peft and base.kind != "mtp":
        with atomic_dir(out_dir / "peft") as tmp:
            export_peft(adapter, spec, tmp, base_model_name_or_path=base.path or "")
    return adapter_dir


def _exports_current(out_dir: Path, config: ConfigDict, recipe: Recipe, step: int) -> bool:
    """Whether the exports the config asks for exist and hold step `step`."""
    try:
        _, meta = checkpoint.read_checkpoint(out_dir / "adapter")
    except (FileNotFoundError, ValueError):
        return False
    if recipe.export is None:
        return meta.get("step") == step
    seeds_file = any((out_dir / n).is_file() for n in ("adapter.hf_lora.pt", "adapter.seeds_lora.pt"))
    return (
        meta.get("step") == step
        and (not config.export.hf_lora or seeds_file)
        and (not config.export.peft or (out_dir / "peft" / "adapter_config.json").is_file())
    )
