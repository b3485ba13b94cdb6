"""ref_tuning: base + reference adapter, trained with the NTP loss.

The reference model of Rho-1 is this adapter bound over the same frozen base.
"""

from __future__ import annotations

from ml_collections import ConfigDict
from tensordict import TensorDict

from wmtp_fn.adapters import init as init_adapter
from wmtp_fn.objectives.ntp import ntp_objective
from wmtp_fn.pipelines.runner import Recipe, Result, lora_spec, open_session, run_recipe

ADAPTER = "lora"


def run(config: ConfigDict) -> Result:
    session = open_session(config)
    adapter, spec = init_adapter(session.base, lora_spec(config.lora), seed=config.seed)
    base, chunk = session.base.module, config.train.ce_chunk_size
    return run_recipe(session, Recipe(
        name="ref_tuning",
        params=TensorDict({ADAPTER: adapter}, batch_size=[]),
        specs={ADAPTER: spec},
        train=ntp_objective(base, spec, name=ADAPTER, chunk_size=chunk, train=True),
        eval=ntp_objective(base, spec, name=ADAPTER, chunk_size=chunk, train=False),
        export=ADAPTER,
    ))
