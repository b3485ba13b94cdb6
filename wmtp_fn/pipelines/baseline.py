"""baseline: base + policy adapter trained with the MTP loss, uniform weights.

The base is an MTP base (Meta's layout, `models.mtp`): loaded as one, or a Llama turned into one
with `mtp.n_future - 1` heads copied from its last layer. The policy adapter covers the trunk
and every head.
"""

from __future__ import annotations

from ml_collections import ConfigDict
from tensordict import TensorDict

from wmtp_fn.adapters import init as init_adapter
from wmtp_fn.models.base import Base
from wmtp_fn.models.mtp import mtp_from_llama
from wmtp_fn.objectives.mtp import mtp_objective
from wmtp_fn.pipelines.runner import Recipe, Result, lora_spec, open_session, run_recipe

ADAPTER = "policy"


def as_mtp(n_future: int):
    """`to_base` for `open_session`: an MTP base as is, a Llama turned into one."""

    def convert(base: Base) -> Base:
        if base.kind == "mtp":
            return base
        return Base.of(mtp_from_llama(base.module, n_future), "mtp", base.path)

    return convert


def run(config: ConfigDict) -> Result:
    session = open_session(config, to_base=as_mtp(config.mtp.n_future))
    adapter, spec = init_adapter(session.base, lora_spec(config.lora), seed=config.seed)
    base, chunk = session.base.module, config.train.ce_chunk_size
    return run_recipe(session, Recipe(
        name="baseline",
        params=TensorDict({ADAPTER: adapter}, batch_size=[]),
        specs={ADAPTER: spec},
        train=mtp_objective(base, spec, name=ADAPTER, chunk_size=chunk, train=True),
        eval=mtp_objective(base, spec, name=ADAPTER, chunk_size=chunk, train=False),
        export=ADAPTER,
    ))
