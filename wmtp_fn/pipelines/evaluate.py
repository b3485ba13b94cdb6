"""evaluate: sample completions with each adapter bound (or none), judge them in the sandbox,
report pass@k side by side. Nothing is trained.

    validate the inputs (device, tokenizer, base directory, problems, adapter paths, settings)
    -> write out_dir/config.json -> load the base (slots on every linear) -> per adapter:
       read it (any format, strictly validated) -> generate n samples per problem -> write
       results/<name>/samples.jsonl -> execute -> results/<name>/verdicts.jsonl
    -> report.json + report.md

Every adapter gets the same problems, prompts and seed, so the comparison is paired.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ml_collections import ConfigDict

from wmtp_fn.atomic import atomic_write_text
from wmtp_fn.config import flat_config
from wmtp_fn.dist.comm import launched
from wmtp_fn.errors import ConfigError
from wmtp_fn.eval.prompts import Problem, check_prompt_format, load_humaneval, load_record_problems, stops_for
from wmtp_fn.eval.report import EvalSettings, build_report, pass_counts, write_report, write_samples, write_verdicts
from wmtp_fn.pipelines.runner import load_tokenizer, resolve_device, resolve_dtype

BASE_ALONE = "base"
RESULTS = "results"  # out_dir/results/<name>/: out_dir/base is the embedded base's directory
BENCHMARKS = ("humaneval", "records")


@dataclass(frozen=True)
class EvalResult:
    out_dir: Path
    report_path: Path
    report: dict[str, Any]


# ----------------------------------------------------------------------------- inputs


def parse_adapters(items) -> list[tuple[str, str | None]]:
    """``eval.adapters`` -> ``[(name, path or None for the base alone)]``.

    Items: ``"base"``, ``"path"`` (named after the path: its last part, or the run directory's
    for ``run/adapter``, a file's stem) or ``"name=path"``. Nothing = the base alone.
    """
    items = [items] if isinstance(items, str) else list(items)
    items = [part.strip() for item in items for part in str(item).split(",") if part.strip()]
    out: list[tuple[str, str | None]] = []
    for item in items or [BASE_ALONE]:
        name, eq, path = item.partition("=")
        if not eq:
            path = item
            p = Path(item)
            name = BASE_ALONE if item == BASE_ALONE else (p.parent.name if p.name == "adapter" else p.name.split(".")[0])
        name, path = name.strip(), path.strip()
        if not name or "/" in name or name.startswith("."):
            raise ConfigError(f"eval.adapters: {item!r}: a name must be a plain file name (name=path)")
        if eq and not path:
            raise ConfigError(f"eval.adapters: {item!r} has no path after '='")
        if path != BASE_ALONE and not Path(path).exists():
            raise ConfigError(f"eval.adapters: {path!r} does not exist (expected an adapter directory or file)")
        if name in [n for n, _ in out]:
            raise ConfigError(f"eval.adapters: the name {name!r} is used twice; label them with name=path")
        out.append((name, None if path == BASE_ALONE else path))
    return out


def heldout_ids(ev: ConfigDict) -> list[str]:
    """The problems training runs hold out for evaluation: `data.heldout_fraction` /
    `data.heldout_seed` of the training data (given as `eval.split_data`, `eval.heldout_fraction`,
    `eval.heldout_seed`)."""
    from wmtp_fn.data.embedded import embedded_dataset_path
    from wmtp_fn.data.index import build_index
    from wmtp_fn.data.split import configured_held_out

    path = ev.split_data or str(embedded_dataset_path())
    if not Path(path).is_file():
        raise ConfigError(f"eval.split_data: {path!r} is not a file")
    if not ev.heldout_fraction > 0:
        raise ConfigError(f"eval.split='heldout' needs eval.heldout_fraction > 0 (the training runs' "
                          f"data.heldout_fraction), got {ev.heldout_fraction!r}")
    cfg = ConfigDict({"heldout_fraction": float(ev.heldout_fraction), "heldout_seed": int(ev.heldout_seed)})
    return configured_held_out(build_index(path), cfg)[1]


def trained_on(adapters: list[tuple[str, str | None]], task_ids: list[str], *, allow: bool) -> dict[str, Any]:
    """Per adapter, the evaluated problems its training run could have seen (from the run
    config the adapter carries: `data.*` and `seed`); `None` when the adapter records no run
    config (PEFT, foreign files). Any overlap is refused unless `allow` (then it is reported)."""
    from wmtp_fn.data.stream import trained_problem_ids
    from wmtp_fn.formats import adapter_run_config

    found: dict[str, Any] = {}
    for name, path in adapters:
        if path is None:
            continue
        flat = adapter_run_config(path)
        if flat is None or "seed" not in flat:
            found[name] = None
            print(f"warning: eval.adapters: {name} ({path}) records no training run config; "
                  "whether it saw the evaluated problems is unknown")
            continue
        overlap = sorted(set(task_ids) & trained_problem_ids(flat))
        found[name] = overlap
        if overlap and not allow:
            raise ConfigError(
                f"eval.adapters: {name} ({path}) was trained on {len(overlap)} of the {len(task_ids)} evaluated "
                f"problems (e.g. {overlap[0]}); evaluate the problems its run held out (train with "
                "data.heldout_fraction, evaluate with eval.split=heldout), or set eval.allow_trained_problems=true "
                "to report them flagged"
            )
    return found


def load_problems(ev: ConfigDict) -> tuple[list[Problem], list[str] | None, str]:
    """The benchmark's problems, the explicit selection (None = all) and where it came from."""
    if ev.benchmark not in BENCHMARKS:
        raise ConfigError(f"eval.benchmark is {ev.benchmark!r}; expected one of {list(BENCHMARKS)}")
    if ev.split not in ("all", "heldout"):
        raise ConfigError(f"eval.split is {ev.split!r}; expected 'all' or 'heldout'")
    selection = list(ev.problems) or None
    origin = "explicit eval.problems" if selection else "all"
    if ev.split == "heldout":
        if selection:
            raise ConfigError("eval.problems and eval.split='heldout' both select problems; set one")
        selection = heldout_ids(ev)
        origin = (f"held-out split of {ev.split_data or 'the embedded data'} (heldout_fraction "
                  f"{ev.heldout_fraction}, heldout_seed {ev.heldout_seed})")
    if ev.benchmark == "humaneval":
        problems = load_humaneval(problems=selection)
    else:
        from wmtp_fn.data.embedded import embedded_dataset_path

        path = ev.records_path or str(embedded_dataset_path())
        if not Path(path).is_file():
            raise ConfigError(f"eval.records_path: {path!r} is not a file")
        problems = load_record_problems(path, problems=selection)
    return problems, selection, origin


def sandbox_limits(cfg: ConfigDict):
    from wmtp_fn.sandbox import Limits

    if not cfg.timeout_s > 0 or not cfg.memory_gb > 0 or cfg.workers < 1:
        raise ConfigError(f"sandbox: timeout_s and memory_gb must be > 0 and workers >= 1, got {dict(cfg)}")
    return Limits(timeout_s=float(cfg.timeout_s), memory_bytes=int(cfg.memory_gb * 1024**3))


def open_eval_base(config: ConfigDict, out_dir: Path, tokenizer, device, dtype):
    """The base (the embedded tiny Llama when base.path is empty), as an MTP base when asked,
    with LoRA slots on every linear (any adapter's targets fit)."""
    from wmtp_fn.models.base import Base, embedded_base_dir, open_base
    from wmtp_fn.models.mtp import mtp_from_llama
    from wmtp_fn.models.prepare import prepare

    path = config.base.path or embedded_base_dir(out_dir, tokenizer, hidden_size=config.base.tiny_hidden_size,
                                                 layers=config.base.tiny_layers)
    base = open_base(path, dtype=dtype, device=device)
    if config.base.mtp_n_future and base.kind != "mtp":
        base = Base.of(mtp_from_llama(base.module, config.base.mtp_n_future), "mtp", base.path)
    vocab = base.module.config.vocab_size
    if len(tokenizer) > vocab:
        raise ConfigError(f"the tokenizer has {len(tokenizer)} tokens but the base at {path} has vocab_size {vocab}")
    return prepare(base, targets="all")


# ----------------------------------------------------------------------------- the run


def samples_of(problems: list[Problem], generations, prompt_format: str) -> list[dict[str, Any]]:
    """samples.jsonl rows: the completion (extracted), and the raw generation kept with it."""
    from wmtp_fn.eval.prompts import completion_for

    return [
        {"task_id": p.task_id, "sample": i, "completion": completion_for(p, g.text, prompt_format),
         "generation": g.text, "finish": g.finish, "n_tokens": g.n_tokens}
        for p, row in zip(problems, generations) for i, g in enumerate(row)
    ]


def run(config: ConfigDict) -> EvalResult:
    from wmtp_fn.formats import read_adapter
    from wmtp_fn.eval.execute import execute
    from wmtp_fn.eval.generate import Sampling, generate_samples, next_token_model
    from wmtp_fn.eval.prompts import prompt_for

    if launched() and int(os.environ["WORLD_SIZE"]) > 1:
        raise ConfigError("the evaluate pipeline runs in one process (every rank would write the same report); "
                          "start it with python -m wmtp_fn, not torchrun")
    ev = config.eval
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    if config.base.path:
        from wmtp_fn.models.base import check_base_dir

        check_base_dir(config.base.path, key="base.path")
    tokenizer = load_tokenizer(config.data, config.base.path)
    check_prompt_format(ev.prompt_format)
    problems, selection, origin = load_problems(ev)
    adapters = parse_adapters(ev.adapters)
    if ev.baseline and ev.baseline not in [n for n, _ in adapters]:
        raise ConfigError(f"eval.baseline is {ev.baseline!r}, not one of the adapters {[n for n, _ in adapters]}")
    sampling = Sampling(max_new_tokens=ev.max_new_tokens, temperature=float(ev.temperature), top_p=float(ev.top_p),
                        stops=stops_for(ev.prompt_format), batch_size=ev.batch_size, cache=ev.cache)
    limits = sandbox_limits(config.sandbox)
    prompts = [prompt_for(p, ev.prompt_format, tokenizer=tokenizer) for p in problems]
    seen = trained_on(adapters, [p.task_id for p in problems], allow=ev.allow_trained_problems)

    out_dir = Path(config.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "config.json", json.dumps(flat_config(config), indent=2, sort_keys=True) + "\n")
    base = open_eval_base(config, out_dir, tokenizer, device, dtype)
    view = next_token_model(base)
    print(f"evaluate: base {base.path} ({base.kind}, {dtype}, {device}); {len(problems)} {ev.benchmark} problems "
          f"({origin}) x {ev.n_samples} samples; adapters {[n for n, _ in adapters]}")

    results, speed = {}, {}
    by_id = {p.task_id: p for p in problems}
    for name, path in adapters:
        adapter = None if path is None else read_adapter(path, base)
        start = time.perf_counter()
        generations = generate_samples(view, tokenizer, prompts, ev.n_samples, sampling, base=base, adapter=adapter,
                                       seed=config.seed, progress=True, desc=f"generate {name}")
        seconds = time.perf_counter() - start
        tokens = sum(g.n_tokens for row in generations for g in row)
        speed[name] = {"generated_tokens": tokens, "seconds": round(seconds, 3),
                       "tokens_per_s": round(tokens / max(seconds, 1e-9), 1)}
        samples = samples_of(problems, generations, ev.prompt_format)
        write_samples(out_dir / RESULTS / name / "samples.jsonl", samples)
        verdicts = execute(samples, by_id, ev.prompt_format, limits=limits, workers=config.sandbox.workers,
                           progress=True, desc=f"execute {name}")
        write_verdicts(out_dir / RESULTS / name / "verdicts.jsonl", verdicts)
        results[name] = pass_counts(verdicts)

    settings = EvalSettings(
        benchmark=ev.benchmark, n_problems=len(problems), n_samples=ev.n_samples, temperature=float(ev.temperature),
        top_p=float(ev.top_p), seeds=[config.seed], problems=selection,
        extra={"selection": origin, "prompt_format": ev.prompt_format, "max_new_tokens": ev.max_new_tokens,
               "stops": list(sampling.stops), "batch_size": ev.batch_size, "cache": ev.cache, "base": str(base.path),
               "base_kind": base.kind, "dtype": str(dtype).removeprefix("torch."), "device": str(device),
               "adapters": {n: p for n, p in adapters}, "sandbox": {"timeout_s": limits.timeout_s,
               "memory_bytes": limits.memory_bytes, "workers": config.sandbox.workers}, "generation": speed,
               "trained_on_evaluated_problems": {n: ("unknown" if v is None else len(v)) for n, v in seen.items()}},
    )
    report = build_report(settings, results, {n: ev.prompt_format for n, _ in adapters}, ks=tuple(ev.ks),
                          baseline=ev.baseline or None, n_boot=ev.n_boot, seed=config.seed)
    json_path, md_path = write_report(out_dir, report)
    for name, table in report["adapters"].items():
        cells = ", ".join(f"{k} {100 * v['mean']:.1f}%" for k, v in table["pass_at_k"].items())
        print(f"evaluate {name}: {cells} ({speed[name]['tokens_per_s']:,.0f} generated tok/s)")
    print(f"evaluate done: {json_path}, {md_path}")
    return EvalResult(out_dir, json_path, report)
