"""rho1: base + policy adapter trained with the Rho-1 selective MTP loss against a reference.

As `baseline`, the policy adapter trains on an MTP base (a Llama turned into one), but each head
only on the tokens whose loss most exceeds the reference's (`objectives.rho1`). The reference is
a `ref_tuning` adapter bound on the *same* frozen base: head 0 of an MTP base made from a Llama
is that Llama under the same module paths, so no second copy of any base weight exists. The
reference adapter is read and validated against the Llama it was trained on (its base
fingerprint, keys and shapes) before that Llama becomes the MTP base.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import get_args

from ml_collections import ConfigDict
from tensordict import TensorDict

from wmtp_fn.adapters import AdapterSpec, install_slots
from wmtp_fn.adapters import init as init_adapter
from wmtp_fn.formats import adapter_format, read_adapter
from wmtp_fn.errors import CheckpointError, ConfigError
from wmtp_fn.losses.rho1 import MODES
from wmtp_fn.models.base import Base, check_base_dir
from wmtp_fn.models.mtp import is_mtp_config
from wmtp_fn.objectives.rho1 import Reference, Rule, Scope, rho1_objective
from wmtp_fn.pipelines.baseline import as_mtp
from wmtp_fn.pipelines.runner import Recipe, Result, Session, lora_spec, open_session, run_recipe

ADAPTER = "policy"


def check_config(config: ConfigDict) -> None:
    """One-line errors naming the `rho1.*` key, before the run writes anything."""
    cfg = config.rho1
    if not cfg.reference:
        raise ConfigError(
            "rho1.reference is empty: run experiments/ref_tuning.py first and pass its out_dir, "
            "e.g. --config.rho1.reference=runs/ref_tuning"
        )
    try:
        adapter_format(cfg.reference)
    except CheckpointError as e:
        raise ConfigError(f"rho1.reference: {e} (a ref_tuning out_dir, its adapter/, an hf_lora file or a PEFT dir)") from None
    if not 0 <= cfg.ratio <= 1:
        raise ConfigError(f"rho1.ratio is {cfg.ratio!r}; expected the selected fraction of each head's tokens, in [0, 1]")
    for key, allowed in (("mode", MODES), ("scope", get_args(Scope)), ("rule", get_args(Rule))):
        if cfg[key] not in allowed:
            raise ConfigError(f"rho1.{key} is {cfg[key]!r}; expected one of {allowed}")
    if cfg.scope == "step" and cfg.rule == "quantile":
        raise ConfigError("rho1.rule='quantile' (the seeds' rule) selects per micro-batch; use rho1.scope='micro_batch'")
    if config.base.path and is_mtp_config(check_base_dir(config.base.path)):
        raise ConfigError(
            f"base.path: {config.base.path!r} is already an MTP base; rho1 binds the reference adapter on head 0 "
            "of an MTP base made from the Llama ref_tuning trained it on, so give that Llama directory"
        )


def reference_on_mtp(path: str | Path, n_future: int) -> tuple[Callable[[Base], Base], Callable[[], tuple[TensorDict, AdapterSpec]]]:
    """`(to_base, reference)`: `to_base` for `open_session` reads the reference adapter at
    `path` against the Llama it gets (strict: base fingerprint, keys, shapes), turns the Llama
    into the MTP base and gives the MTP base slots for the adapter's targets (its head 0 has the
    Llama's module paths); `reference()` then returns `(adapter, spec)`. `open_session` hands
    back only the base, hence the second function."""
    read: dict[str, tuple[TensorDict, AdapterSpec]] = {}

    def to_base(llama: Base) -> Base:
        install_slots(llama.module, "all")  # read_adapter validates against slots; the Llama is dropped after
        try:
            adapter, spec = read_adapter(path, llama)
        except CheckpointError as e:
            raise CheckpointError(
                f"rho1.reference: {e}\n  (the reference must come from a ref_tuning run on this run's base: "
                "the same base.path, or the same base.tiny_* for the embedded base)"
            ) from None
        mtp = as_mtp(n_future)(llama)
        install_slots(mtp.module, spec.targets)
        read["reference"] = (adapter, spec)
        return mtp

    return to_base, lambda: read["reference"]


def recipe(session: Session, reference: Reference) -> Recipe:
    """The policy adapter on the session's MTP base, trained and validated with `rho1_objective`."""
    config = session.config
    adapter, spec = init_adapter(session.base, lora_spec(config.lora), seed=config.seed)
    base, cfg = session.base.module, config.rho1

    def objective(train: bool):
        return rho1_objective(base, spec, reference=reference, name=ADAPTER, ratio=float(cfg.ratio), mode=cfg.mode,
                              scope=cfg.scope, rule=cfg.rule, chunk_size=config.train.ce_chunk_size, train=train)

    return Recipe(
        name="rho1",
        params=TensorDict({ADAPTER: adapter}, batch_size=[]),
        specs={ADAPTER: spec},
        train=objective(True),
        eval=objective(False),
        export=ADAPTER,
    )


def open_rho1(config: ConfigDict) -> tuple[Session, Recipe]:
    """Check the config, open the session on the MTP base with the reference read, and state the recipe."""
    check_config(config)
    to_base, reference = reference_on_mtp(config.rho1.reference, config.mtp.n_future)
    session = open_session(config, to_base=to_base)
    return session, recipe(session, Reference(*reference()))  # model=None: the session's own base


def run(config: ConfigDict) -> Result:
    return run_recipe(*open_rho1(config))
