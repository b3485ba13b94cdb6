"""run_prepare's contract messages in full (surviving mutants of train.step): the layouts it
compares are printed with dotted leaf names, shapes and dtypes."""

import pytest
import torch
from tensordict import TensorDict

from tests.train.train_toy_lm import init_extra, init_params, make_batch, make_objective
from wmtp_fn.dist.comm import LOCAL
from wmtp_fn.train.step import run_prepare


def with_prepare(prepare):
    base = make_objective()
    return type(base)(count=base.count, loss=base.loss, prepare=prepare)


def test_a_changed_layout_is_printed_leaf_by_leaf():
    new = TensorDict({"new": {"x": torch.zeros(3)}}, batch_size=[])
    objective = with_prepare(lambda params, extra, mbs, comm: (new, mbs))
    with pytest.raises(ValueError) as err:
        run_prepare(objective, init_params(), init_extra(), [make_batch(1)], LOCAL)
    assert str(err.value) == (
        "objective.prepare changed the layout of extra from "
        "[('stats.ema', (), torch.float32), ('stats.tokens_seen', (), torch.float64)] to "
        "[('new.x', (3,), torch.float32)]; give init_train_state the full initial extra")


def test_prepare_must_keep_one_micro_batch_per_input_and_return_a_pair():
    objective = with_prepare(lambda params, extra, mbs, comm: (extra, mbs[:1]))
    with pytest.raises(ValueError, match=r"^objective\.prepare returned 1 micro-batches for 2; it may add "):
        run_prepare(objective, init_params(), init_extra(), [make_batch(1), make_batch(1, seed=1)], LOCAL)
    objective = with_prepare(lambda params, extra, mbs, comm: [extra, mbs])
    with pytest.raises(TypeError, match=r"^objective\.prepare must return \(extra: TensorDict, micro_batches\)$"):
        run_prepare(objective, init_params(), init_extra(), [make_batch(1)], LOCAL)
