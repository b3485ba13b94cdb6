"""ref_tuning: base + reference adapter, trained with the NTP loss.

The reference model of Rho-1 is this adapter bound over the same frozen base.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from ml_collections import ConfigDict
from tensordict import TensorDict

from wmtp_fn import checkpoint
from wmtp_fn.adapters.seeds_io import save_hf_lora
from wmtp_fn.atomic import atomic_dir
from wmtp_fn.adapters import AdapterSpec, export_peft
from wmtp_fn.adapters import init as init_adapter
from wmtp_fn.data.sampling import Cursor
from wmtp_fn.errors import ConfigError
from wmtp_fn.fingerprint import check_same_base
from wmtp_fn.models.base import check_base_dir
from wmtp_fn.objectives.ntp import ntp_objective
from wmtp_fn.pipelines import common
from wmtp_fn.train.evaluate import evaluate
from wmtp_fn.train.loop import LoopConfig, MetricsLog, fit
from wmtp_fn.train.state import init_train_state
from wmtp_fn.train.step import make_train_step

ADAPTER = "lora"


def export(out_dir: Path, state, cursor: Cursor, spec: AdapterSpec, config: ConfigDict, base_path: str,
           metrics: dict, *, n_train: int) -> Path:
    """Write the run's outputs: the adapter (params checkpoint), and the hf_lora / PEFT exports
    the config asks for. Each is written atomically."""
    adapter_dir = out_dir / "adapter"
    flat_cfg = common.flat_config(config)
    meta = {"config": flat_cfg, "metrics": dict(metrics), "base_model_path": base_path, "step": state.step}
    checkpoint.save_params(adapter_dir, state.params, {ADAPTER: spec}, meta=meta)
    if config.export.hf_lora:
        save_hf_lora(
            out_dir / "adapter.hf_lora.pt", state.params[ADAPTER], spec, base_model_path=base_path,
            epoch=cursor.epoch + cursor.position / n_train, train_metrics={"loss": metrics.get("train_loss")},
            val_metrics={"loss": metrics.get("val_loss")}, config=flat_cfg,
        )
    if config.export.peft:
        with atomic_dir(out_dir / "peft") as tmp:
            export_peft(state.params[ADAPTER], spec, tmp, base_model_name_or_path=base_path)
    return adapter_dir


def outputs_current(out_dir: Path, config: ConfigDict, step: int) -> bool:
    """Whether the exports the config asks for exist and hold step `step`."""
    try:
        _, meta = checkpoint.read_checkpoint(out_dir / "adapter")
    except (FileNotFoundError, ValueError):
        return False
    return (
        meta.get("step") == step
        and (not config.export.hf_lora or (out_dir / "adapter.hf_lora.pt").is_file())
        and (not config.export.peft or (out_dir / "peft" / "adapter_config.json").is_file())
    )


@dataclass
class Result:
    out_dir: Path
    adapter_dir: Path
    first_val_loss: float
    final_val_loss: float
    steps: int


def run(config: ConfigDict) -> Result:
    # Everything that can be wrong with the inputs is found before anything is written.
    device = common.resolve_device(config.device)
    dtype = common.resolve_dtype(config.dtype, device)
    if config.train.batch_size % config.train.micro_batch_size:
        raise ConfigError(
            f"train.batch_size={config.train.batch_size} is not a multiple of "
            f"train.micro_batch_size={config.train.micro_batch_size}"
        )
    if config.base.path:
        check_base_dir(config.base.path, key="base.path")
    tokenizer = common.load_tokenizer(config.data, config.base.path)
    train_set, val_set = common.ntp_record_sets(config.data, config.seed)
    skipped: list = []
    val_cpu = common.encoded_batches(
        val_set, range(len(val_set)), tokenizer, config.data, micro_batch_size=config.train.micro_batch_size, skipped=skipped
    )
    out_dir, resume_from = common.start_run(config)
    torch.manual_seed(config.seed)

    base, base_path = common.load_frozen_base(config.base, tokenizer, out_dir, device, dtype)
    common.prepare_base(base, config.base, config.lora.targets)
    val_batches = [common.to_device(mb, device) for mb in val_cpu]

    total_steps = config.train.steps
    horizon = common.schedule_horizon(common.flat_config(config))
    opt_cfg, sched_cfg = common.optimizer_configs(config.optim, config.schedule, horizon)
    adapter, spec = init_adapter(base, common.lora_spec(config.lora), seed=config.seed)
    specs = {ADAPTER: spec}
    if resume_from is not None:
        state, cursor, meta = common.restore_train(resume_from, device)
        saved = AdapterSpec.from_dict(meta["adapters"][ADAPTER])
        check_same_base(saved.base_fingerprint, spec.base_fingerprint, what=f"checkpoint {resume_from}")
        if state.step >= total_steps:
            metrics = meta.get("metrics", {})
            if not outputs_current(out_dir, config, state.step):  # the run died after its last checkpoint
                export(out_dir, state, cursor, spec, config, base_path, metrics, n_train=len(train_set))
            print(f"{out_dir} is already complete ({state.step}/{total_steps} steps; adapter in {out_dir / 'adapter'}); "
                  f"to train further, raise --config.train.steps (and keep --config.schedule.total_steps={horizon})")
            last = metrics.get("val_loss")
            return Result(out_dir, out_dir / "adapter", float("nan"), float("nan") if last is None else last, state.step)
        print(f"resuming {out_dir} from {resume_from.name} (step {state.step})")
    else:
        state = init_train_state(TensorDict({ADAPTER: adapter}, batch_size=[]), opt_cfg, seed=config.seed)
        cursor = Cursor(seed=config.seed)

    chunk = config.train.ce_chunk_size
    train_objective = ntp_objective(base, spec, name=ADAPTER, chunk_size=chunk, train=True)
    eval_objective = ntp_objective(base, spec, name=ADAPTER, chunk_size=chunk, train=False)
    step_fn = make_train_step(train_objective, opt_cfg, sched_cfg, nonfinite=config.train.nonfinite)
    next_batch = common.batch_stream(
        train_set, tokenizer, config.data, batch_size=config.train.batch_size,
        micro_batch_size=config.train.micro_batch_size, device=device, skipped=skipped,
    )
    ckpt_root = out_dir / "checkpoints"

    def save(st, cur, info):
        common.save_train(ckpt_root, st, cur, specs=specs, config=config, info=info, keep=config.train.keep)

    print(
        f"ref_tuning: base {base_path} ({sum(p.numel() for p in base.parameters()):,} frozen params, {dtype}, {device}); "
        f"adapter {spec.variant} r={spec.rank} on {len(spec.targets)} targets "
        f"({sum(t.numel() for t in state.params.values(True, True)):,} trainable); "
        f"{len(train_set)} train / {len(val_set)} val records"
    )
    state, cursor, hist = fit(
        state,
        cursor,
        step_fn=step_fn,
        next_batch=next_batch,
        # NTP keeps no extra state; an objective that does needs the loop to pass the state here.
        evaluate=lambda params: {"val_loss": evaluate(eval_objective, params, TensorDict(), val_batches)["loss"]},
        save=save,
        cfg=LoopConfig(
            total_steps=total_steps,
            log_every=config.train.log_every,
            eval_every=config.train.eval_every,
            save_every=config.train.save_every,
        ),
        log=MetricsLog(out_dir / "metrics.jsonl"),
        desc="ref_tuning",
    )
    if skipped:
        print(f"warning: {len(skipped)} record(s) skipped as too long, e.g. {skipped[0]}")

    final = {"val_loss": hist.val_loss[-1][1] if hist.val_loss else None, "train_loss": hist.train_loss[-1][1] if hist.train_loss else None}
    adapter_dir = export(out_dir, state, cursor, spec, config, base_path, final, n_train=len(train_set))

    first = hist.val_loss[0][1] if hist.val_loss else float("nan")
    last = final["val_loss"] if final["val_loss"] is not None else float("nan")
    print(
        f"ref_tuning done: step {state.step}/{total_steps}, val_loss {first:.4f} -> {last:.4f}, "
        f"{hist.tokens:,} tokens in {hist.seconds:.1f}s{f' since step {hist.start_step}' if hist.start_step else ''} "
        f"({hist.tokens / max(hist.seconds, 1e-9):,.0f} tok/s), "
        f"{hist.skipped} skipped steps; adapter -> {adapter_dir}"
    )
    return Result(out_dir, adapter_dir, first, last, state.step)

