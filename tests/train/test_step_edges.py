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
    with pytest.raises(ValueError, match=r"^objective\.prepare returned 1 micro-batches for 2; it may add entries to them "
                                         r"but must keep one per input micro-batch \(the counts were taken on those\)$"):
        run_prepare(objective, init_params(), init_extra(), [make_batch(1), make_batch(1, seed=1)], LOCAL)
    objective = with_prepare(lambda params, extra, mbs, comm: [extra, mbs])
    with pytest.raises(TypeError, match=r"^objective\.prepare must return \(extra: TensorDict, micro_batches\)$"):
        run_prepare(objective, init_params(), init_extra(), [make_batch(1)], LOCAL)


def test_a_nonfinite_loss_and_grad_norm_are_both_named():
    from tests.train.test_train_step import SCHED, poisoned
    from wmtp_fn.train import adamw
    from wmtp_fn.train.state import init_train_state
    from wmtp_fn.train.step import make_train_step

    cfg = adamw.AdamWConfig(lr=1e-2)
    bad = make_batch(2, seed=9)
    bad["poison"] = torch.tensor(float("nan"))
    step = make_train_step(poisoned, cfg, SCHED, nonfinite="raise")
    with pytest.raises(FloatingPointError, match=r"^train step 0: non-finite loss and grad norm \(loss=nan, grad_norm=nan\); "
                                                 r"the update was skipped$"):
        step(init_train_state(init_params(), cfg, seed=0), [bad])


def test_the_steps_own_metrics_are_fp32():
    from tests.train.test_train_step import SCHED
    from wmtp_fn.train import adamw
    from wmtp_fn.train.state import init_train_state
    from wmtp_fn.train.step import make_train_step

    cfg = adamw.AdamWConfig(lr=1e-2)
    _, metrics = make_train_step(make_objective(), cfg, SCHED)(init_train_state(init_params(), cfg, seed=0), [make_batch(2)])
    assert {k: metrics[k].dtype for k in ("loss", "grad_norm", "lr", "n_tokens", "skipped")} == dict.fromkeys(
        ("loss", "grad_norm", "lr", "n_tokens", "skipped"), torch.float32)


def test_params_of_two_dtypes_take_the_per_leaf_path_with_the_same_gradients():
    """A float64 leaf the loss never reads makes the leaves disagree in dtype: the gradients are
    then tracked leaf by leaf, equal those of the one-flat-leaf path, and the unread leaf gets
    float64 zeros."""
    from wmtp_fn.train.step import accumulate_grads

    params, objective = init_params(), make_objective()
    mbs = [make_batch(2, seed=3), make_batch(1, seed=4)]
    flat = accumulate_grads(objective, params, init_extra(), mbs)
    mixed = params.clone()
    mixed.set(("unused", "w"), torch.ones(3, dtype=torch.float64))
    leafwise = accumulate_grads(objective, mixed, init_extra(), mbs)
    assert torch.equal(leafwise.grads["unused", "w"], torch.zeros(3, dtype=torch.float64))
    for key, g in flat.grads.items(include_nested=True, leaves_only=True):
        assert g.abs().sum() > 0, key
        torch.testing.assert_close(leafwise.grads[key], g, rtol=1e-6, atol=1e-7)
    assert leafwise.loss.item() == flat.loss.item()


def test_a_loss_that_reaches_no_parameter_gives_zero_gradients():
    from wmtp_fn.train.step import accumulate_grads

    base = make_objective()

    def constant(params, extra, batch, scale):
        return torch.zeros(()), torch.zeros(1), {}

    objective = type(base)(count=base.count, loss=constant)
    acc = accumulate_grads(objective, init_params(), init_extra(), [make_batch(2)])
    for key, g in acc.grads.items(include_nested=True, leaves_only=True):
        assert torch.equal(g, torch.zeros_like(g)), key
    with pytest.raises(ValueError, match=r"^accumulate_grads: no micro-batches$"):
        accumulate_grads(objective, init_params(), init_extra(), [])
