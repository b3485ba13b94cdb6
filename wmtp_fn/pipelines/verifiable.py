"""verifiable: base + policy adapter trained with the MTP loss, each token weighted by a frozen
critic's TD advantages (``objectives.verifiable``; the math in docs/losses-critic-td.md).

The policy base is an MTP base (``baseline.as_mtp``). The critic is read from ``critic.path``
(a run directory of experiments/critic.py, or its ``adapter/``): ``params["critic"]`` (absent
when it was trained with ``use_lora = false``) and ``params["value_head"]``, each with its spec.
It is bound over **the same frozen base** the policy trains on, never copied, never trained.

Which hidden state the value head reads follows from the base the critic was trained on (the
base fingerprint in its adapter spec; a head-only critic has no adapter spec, so its
``meta.json`` must carry one as ``base_fingerprint``):

- a critic of the MTP base itself reads ``value_input(trunk)`` = ``norm(z)``, as in training;
- a critic of the plain Llama the MTP base was made from reads ``norm(layers(x))``, the
  Llama's own final-norm hidden state. ``mtp_from_llama`` keeps every Llama layer under its
  own path in ``model.layers`` (the trunk, then head 0 = the Llama's last layer) with the same
  final norm, so that is the MTP base's head-0 path, run through ``HiddenStates`` over
  ``base.model``: the values are the plain Llama critic's, bit for bit, with its adapter keys
  as they are. ``value_input(trunk)`` would be wrong for it: that is one layer earlier, a
  hidden state the head never saw;
- any other critic is refused with an error naming ``critic.path``.

``critic.base_path`` loads a separate critic base instead (e.g. a small Llama critic beside a
large MTP policy): its tokenizer must map every token to the same id as the policy's, and the
critic must have been trained on it. The critic's LoRA slots are installed before ``prepare``.

Validation under the ``random`` / ``shuffled`` controls draws from the global generator: each
validation batch runs under ``seeded(seed)``, so validation numbers repeat across runs and
resumes.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from ml_collections import ConfigDict
from transformers import AutoTokenizer
from tensordict import TensorDict
from torch import nn

from wmtp_fn import checkpoint
from wmtp_fn.adapters import AdapterSpec, install_slots, validate
from wmtp_fn.adapters import init as init_adapter
from wmtp_fn.errors import BaseModelError, CheckpointError, ConfigError
from wmtp_fn.fingerprint import check_same_base
from wmtp_fn.models.base import Base, check_base_dir, open_base
from wmtp_fn.models.llama import HiddenStates
from wmtp_fn.models.value_head import ValueHeadSpec, check_value_head
from wmtp_fn.objectives import Objective
from wmtp_fn.objectives.critic import ADAPTER as CRITIC
from wmtp_fn.objectives.critic import HEAD
from wmtp_fn.objectives.verifiable import TDConfig, initial_extra, verifiable_objective
from wmtp_fn.pipelines.baseline import as_mtp
from wmtp_fn.pipelines.runner import Recipe, Result, Session, lora_spec, open_session, run_recipe
from wmtp_fn.train.rng import seeded

ADAPTER = "policy"
CRITIC_HINT = "train a critic first (python -m wmtp_fn --config experiments/critic.py) and pass its run directory"


@dataclasses.dataclass(frozen=True)
class Critic:
    """A trained critic as read from disk: ``params`` ``{"critic"?, "value_head"}`` (CPU), the
    adapter's spec (None: head only), the head's spec, the fingerprint of the base it was trained
    on (None: unknown), and the directory it came from."""

    params: TensorDict
    adapter_spec: AdapterSpec | None
    head_spec: ValueHeadSpec
    fingerprint: dict[str, str] | None
    root: Path


def run(config: ConfigDict) -> Result:
    return run_recipe(*build(config))


def build(config: ConfigDict) -> tuple[Session, Recipe]:
    """Everything before training: check the TD settings and the critic, open the session (the
    run directory, the MTP base with the critic's slots), bind the critic, build the recipe."""
    td = td_config(config.td)
    critic = read_critic(config.critic.path)
    separate = bool(config.critic.base_path)
    if separate:
        check_base_dir(config.critic.base_path, key="critic.base_path")
    session = open_session(config, to_base=policy_base(config.mtp.n_future, None if separate else critic))
    reads = critic_module(critic, open_critic_base(config, session, critic) if separate else session.base)
    base, chunk = session.base.module, config.train.ce_chunk_size
    adapter, spec = init_adapter(session.base, lora_spec(config.lora), seed=config.seed)
    critic_params = critic.params.to(session.device)

    def objective(train: bool) -> Objective:
        return verifiable_objective(
            base, spec, critic_params, critic.adapter_spec, critic.head_spec, td=td, train=train,
            name=ADAPTER, chunk_size=chunk, critic_base=None if reads is base else reads,
        )

    return session, Recipe(
        name="verifiable",
        params=TensorDict({ADAPTER: adapter}, batch_size=[]),
        specs={ADAPTER: spec},
        train=objective(True),
        eval=repeatable(objective(False), config.seed, session.device),
        export=ADAPTER,
        extra=initial_extra(session.device),
    )


# ----------------------------------------------------------------------------- config


def td_config(td_cfg: ConfigDict) -> TDConfig:
    """``td.*`` as a ``TDConfig``; a ``ConfigError`` naming the first bad key."""
    values = {}
    for f in dataclasses.fields(TDConfig):
        if f.name not in td_cfg:
            raise ConfigError(f"td.{f.name}: missing from the config (experiments/verifiable.py sets every td key)")
        values[f.name] = td_cfg[f.name]
        try:
            TDConfig(**{f.name: values[f.name]})  # each key alone: the error names it
        except (ValueError, TypeError) as e:
            msg = str(e).splitlines()[0]
            raise ConfigError(msg if msg.startswith(f"td.{f.name} ") else f"td.{f.name}={values[f.name]!r}: {msg}") from None
    try:
        return TDConfig(**values)
    except (ValueError, TypeError) as e:  # keys valid alone but not together (w_min > w_max)
        raise ConfigError(f"td: {str(e).splitlines()[0]}") from None


def repeatable(objective: Objective, seed: int, device) -> Objective:
    """``objective`` with its ``prepare`` run under ``seeded(seed)``: validation batches draw
    the same random / shuffled weights on every evaluation."""

    def prepare(*args):
        with seeded(seed, device):
            return objective.prepare(*args)

    return dataclasses.replace(objective, prepare=prepare)


# ----------------------------------------------------------------------------- the critic


def read_critic(path: str) -> Critic:
    """The critic at ``path`` (a critic run directory or its ``adapter/``), on the CPU; an
    error naming ``critic.path`` for anything else. The base check comes once a base is loaded."""
    if not path:
        raise ConfigError(f"critic.path is empty: {CRITIC_HINT} as --config.critic.path")
    given = Path(path)
    root = given if (given / "meta.json").is_file() else given / "adapter"
    if not (root / "meta.json").is_file():
        raise ConfigError(f"critic.path: {path!r} holds no critic (no meta.json, no adapter/meta.json); {CRITIC_HINT}")
    try:
        params, specs, meta = checkpoint.load_params(root)
    except (ValueError, OSError) as e:  # CheckpointError, a safetensors or JSON problem
        raise CheckpointError(f"critic.path: {root}: {str(e).splitlines()[0]}") from None
    head, adapter = specs.get(HEAD), specs.get(CRITIC)
    other = sorted(set(specs) - {HEAD, CRITIC})
    if not isinstance(head, ValueHeadSpec) or not (adapter is None or isinstance(adapter, AdapterSpec)) or other:
        raise CheckpointError(
            f"critic.path: {root} holds subtrees {sorted(specs)}; a critic holds {HEAD!r} (a value head) and "
            f"optionally {CRITIC!r} (its adapter): {CRITIC_HINT}"
        )
    fp = adapter.base_fingerprint if adapter is not None else meta.get("base_fingerprint")
    return Critic(params.select(*specs), adapter, head, fp, root)


def same_base(fingerprint: dict[str, str] | None, base: Base) -> bool:
    try:
        check_same_base(fingerprint, base.fingerprint)
    except ValueError:
        return False
    return fingerprint is not None


def policy_base(n_future: int, critic: Critic | None):
    """``to_base`` for ``open_session``: ``as_mtp(n_future)``; with the ``critic`` that shares
    the base, first refuse a critic of another base (neither this MTP base nor the Llama it was
    made from), then install the critic adapter's slots (``prepare`` adds the policy's)."""
    to_mtp = as_mtp(n_future)

    def convert(loaded: Base) -> Base:
        mtp = to_mtp(loaded)
        if critic is None:
            return mtp
        if not (same_base(critic.fingerprint, mtp) or (loaded.kind != "mtp" and same_base(critic.fingerprint, loaded))):
            raise CheckpointError(_another_base(critic, f"the base at {loaded.path} (as a Llama or as the MTP base made from it)"))
        if critic.adapter_spec is not None:
            install_slots(mtp.module, critic.adapter_spec.targets)
        return mtp

    return convert


def open_critic_base(config: ConfigDict, session: Session, critic: Critic) -> Base:
    """The separate critic base at ``critic.base_path``: its tokenizer must give every token the
    policy's id; the critic must have been trained on it; its slots are installed."""
    key, path = "critic.base_path", config.critic.base_path
    try:
        theirs = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise BaseModelError(f"{key}: cannot load a tokenizer from {path!r} ({str(e).splitlines()[0]})") from None
    if theirs.get_vocab() != session.tokenizer.get_vocab():
        ours, diff = session.tokenizer.get_vocab(), theirs.get_vocab()
        first = next((t for t in sorted(set(ours) | set(diff)) if ours.get(t) != diff.get(t)), None)
        raise BaseModelError(
            f"{key}: the tokenizer at {path!r} ({len(diff)} tokens) is not the policy's ({len(ours)} tokens; "
            f"token {first!r} is id {diff.get(first)} there, {ours.get(first)} here): the critic must read the same ids"
        )
    base = open_base(path, dtype=session.dtype, device=session.device, key=key)
    if not same_base(critic.fingerprint, base):
        raise CheckpointError(_another_base(critic, f"the critic base at {path}"))
    if critic.adapter_spec is not None:
        install_slots(base.module, critic.adapter_spec.targets)
    return base


def critic_module(critic: Critic, base: Base) -> nn.Module:
    """The module the critic's value model runs on: ``base.module`` when the critic was trained
    on ``base``; else (``policy_base`` checked it) the critic of the Llama an MTP ``base`` was
    made from, whose hidden state is the MTP base's head-0 path (module docstring). The critic's
    adapter and head are validated against it (keys, shapes, hidden size)."""
    module = base.module if same_base(critic.fingerprint, base) else HiddenStates(base.module)
    try:
        if critic.adapter_spec is not None:
            validate(critic.params[CRITIC], critic.adapter_spec, module, check_base=False)
        check_value_head(critic.params[HEAD], critic.head_spec.kind, base.module.config.hidden_size)
    except ValueError as e:
        raise CheckpointError(f"critic.path: {critic.root}: {e}") from None
    return module


def _another_base(critic: Critic, what: str) -> str:
    if critic.fingerprint is None:
        return (
            f"critic.path: {critic.root} is a head-only critic that records no base fingerprint (meta.json "
            f"'base_fingerprint'), so it cannot be checked against {what}"
        )
    return (
        f"critic.path: {critic.root} was trained on another base than {what} (base fingerprint "
        f"{critic.fingerprint.get('weights')}); train the critic on the same base.path (and base.tiny_* for the embedded base)"
    )
