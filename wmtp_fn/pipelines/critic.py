"""critic: a value model, base + critic adapter + value head, trained on (correct, incorrect) pairs.

The value model (`objectives.critic.value_model`) reads the base's final-norm hidden states
with the critic adapter `params["critic"]` bound and the value head `params["value_head"]` on
top; `critic.use_lora = false` trains the head alone over the frozen backbone. With
`critic.mtp_n_future >= 2` the base is the MTP base the policy pipelines build from the same
Llama (`baseline.as_mtp`), so a verifiable run binds this critic over its own policy base.
The data are pairs of the same problem (`data.pairs`); the exports are `adapter/` (both
subtrees with their specs) and the seeds' hf_lora file with `value_head_state_dict`.
"""

from __future__ import annotations

from ml_collections import ConfigDict
from tensordict import TensorDict

from wmtp_fn.adapters import init as init_adapter
from wmtp_fn.data.pairs import PAIRINGS, encoded_pair_batches, pair_sets, pair_stream
from wmtp_fn.data.schema import DataError
from wmtp_fn.data.stream import to_device
from wmtp_fn.errors import ConfigError
from wmtp_fn.models.value_head import KINDS, ValueHeadSpec, init_value_head
from wmtp_fn.objectives.critic import (
    ADAPTER, HEAD, LambdaSchedule, critic_auc, lambda_extra, lambda_return_objective, pairwise_objective, value_model,
)
from wmtp_fn.pipelines.baseline import as_mtp
from wmtp_fn.pipelines.runner import Recipe, Result, Stream, lora_spec, open_session, run_recipe

LOSSES = ("pairwise", "lambda_return")
VALUE_LOSSES = ("mse", "smooth_l1")


def check_config(c: ConfigDict) -> LambdaSchedule:
    """One-line `ConfigError`s naming the `critic.*` key; returns the λ schedule."""
    choices = {"critic.loss": (c.loss, LOSSES), "critic.pairing": (c.pairing, PAIRINGS),
               "critic.head.kind": (c.head.kind, KINDS), "critic.value_loss": (c.value_loss, VALUE_LOSSES)}
    for key, (value, allowed) in choices.items():
        if value not in allowed:
            raise ConfigError(f"{key} is {value!r}; expected one of {allowed}")
    if c.mtp_n_future == 1 or c.mtp_n_future < 0:
        raise ConfigError(f"critic.mtp_n_future is {c.mtp_n_future}; expected 0 (the Llama base) or >= 2 (an MTP base)")
    if not c.head.lr_ratio > 0:
        raise ConfigError(f"critic.head.lr_ratio is {c.head.lr_ratio}; expected a number > 0")
    for key in ("n_pairs", "val_n_pairs"):
        if c[key] < 0:
            raise ConfigError(f"critic.{key} is {c[key]}; expected 0 (all pairs) or a positive count")
    try:
        return LambdaSchedule(**c.lam.to_dict())
    except (ConfigError, ValueError) as e:
        raise ConfigError(f"critic.lam: {e}") from None


def pair_data(config: ConfigDict, tokenizer, device) -> Stream:
    """The runner's `data`: training pairs streamed from the cursor, validation pairs fixed."""
    train, val = pair_sets(config.data, config.critic, tokenizer, config.seed)
    mb = config.train.micro_batch_size
    val_cpu, skipped = encoded_pair_batches(val, range(len(val)), tokenizer, config.data, micro_batch_size=mb)
    if skipped:
        print(f"warning: {len(skipped)} validation record(s) skipped as too long (their pairs dropped), e.g. {skipped[0]}")
    if not val_cpu:
        raise DataError(val.index["path"], f"no validation pair fits data.max_length={config.data.max_length}")
    next_batch = pair_stream(train, tokenizer, config.data, batch_size=config.train.batch_size, micro_batch_size=mb,
                             device=device)
    return Stream(next_batch, len(train), [to_device(b, device) for b in val_cpu],
                  f"{len(train)} train / {len(val)} val pairs")


def run(config: ConfigDict) -> Result:
    c = config.critic
    lam = check_config(c)
    session = open_session(config, to_base=as_mtp(c.mtp_n_future) if c.mtp_n_future else None, data=pair_data)
    base = session.base.module
    head_spec = ValueHeadSpec(c.head.kind, base.config.hidden_size, dropout=float(c.head.dropout),
                              bias_init=float(c.head.bias_init))
    params = {HEAD: init_value_head(c.head.kind, head_spec.d, bias_init=head_spec.bias_init, seed=config.seed)}
    specs, critic_spec = {HEAD: head_spec}, None
    if c.use_lora:
        params[ADAPTER], critic_spec = init_adapter(session.base, lora_spec(config.lora), seed=config.seed)
        specs[ADAPTER] = critic_spec
    elif config.export.hf_lora:
        print("critic.use_lora is false: no critic adapter for the seeds' hf_lora file; the head is in adapter/")

    if c.loss == "pairwise":
        train, evaluate = (pairwise_objective(base, critic_spec, head_spec, train=t) for t in (True, False))
        extra = TensorDict({}, batch_size=[])
    else:
        train, evaluate = (lambda_return_objective(base, critic_spec, head_spec, lam_schedule=lam, gamma=float(c.gamma),
                                                   value_loss=c.value_loss, delta=float(c.delta), train=t)
                           for t in (True, False))
        extra = lambda_extra(session.device)
    values = value_model(base, critic_spec, head_spec)
    return run_recipe(session, Recipe(
        name="critic",
        params=TensorDict(params, batch_size=[]).to(session.device),
        specs=specs,
        train=train,
        eval=evaluate,
        export=ADAPTER if c.use_lora else None,
        extra=extra,
        value_head=HEAD,
        lr_multipliers={f"{HEAD}.*": float(c.head.lr_ratio)} if c.head.lr_ratio != 1.0 else {},
        val_metrics=lambda p: {"auc": float(critic_auc(values, p, session.stream.val_batches))},
    ))
