"""The Comm seam: a fake two-rank Comm in one process (two threads whose ``sum_`` meets at a
barrier) gives the same update as one rank on the concatenated batch; the per-step RNG folds
in the rank."""

import threading

import pytest
import torch

from tests.train.train_toy_lm import concat, init_extra, init_params, make_batch, make_objective, make_stateful_objective
from wmtp_fn.dist.comm import LOCAL, Comm, LocalComm
from wmtp_fn.objectives import Objective
from wmtp_fn.train import adamw
from wmtp_fn.train.evaluate import evaluate
from wmtp_fn.train.rng import seeded, step_seed
from wmtp_fn.schedule import ScheduleConfig
from wmtp_fn.train.state import flatten_state, init_train_state
from wmtp_fn.train.step import make_train_step

CFG = adamw.AdamWConfig(lr=1e-2, weight_decay=0.1, max_grad_norm=1.0, lr_multipliers={"lora_B": 4.0})
SCHED = ScheduleConfig(kind="cosine", warmup_steps=1, total_steps=6, min_lr_ratio=0.1)


class ThreadComm:
    """Rank ``rank`` of ``world_size`` threads: ``sum_`` deposits the tensor, waits for all, and
    sums the deposits in rank order (so every rank computes the identical result)."""

    def __init__(self, rank: int, world_size: int, slots: list, barrier: threading.Barrier, calls: list):
        self.rank, self.world_size = rank, world_size
        self._slots, self._barrier, self._calls = slots, barrier, calls

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        self._slots[self.rank] = tensor.detach().clone()
        self._barrier.wait()
        total = self._slots[0].clone()
        for other in self._slots[1:]:
            total += other
        if self.rank == 0:
            self._calls.append((tuple(tensor.shape), tensor.dtype))
        self._barrier.wait()  # nobody overwrites a slot before everyone has read it
        tensor.copy_(total)
        return tensor


def run_ranks(fn, per_rank_args):
    """Run ``fn(comm, *args)`` on one thread per rank; returns (results by rank, collective log)."""
    world = len(per_rank_args)
    slots, calls = [None] * world, []
    barrier = threading.Barrier(world, timeout=60)
    results, errors = [None] * world, []

    def target(rank):
        try:
            results[rank] = fn(ThreadComm(rank, world, slots, barrier, calls), *per_rank_args[rank])
        except BaseException as e:  # surfaced below; abort the barrier so the other rank stops too
            errors.append(e)
            barrier.abort()

    rng = torch.get_rng_state()
    threads = [threading.Thread(target=target, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    torch.set_rng_state(rng)  # both threads forked the global generator; restore what the test had
    if errors:
        raise errors[0]
    return results, calls


def train(comm, batches, objective_fn, steps):
    step = make_train_step(objective_fn(), CFG, SCHED, comm=comm)
    state = init_train_state(init_params(), CFG, seed=0, extra=init_extra())
    metrics = []
    for b in batches[:steps]:
        state, m = step(state, b)
        metrics.append(m)
    return state, metrics


def step_batches():
    """Per step: rank 0's micro-batches, rank 1's micro-batches (unequal sizes and counts).
    Rank 1 has one micro-batch, so that one rank accumulating ``(a + b) + c`` adds in the order
    of the two-rank sum ``(a + b) + (c)`` and the comparison can be bitwise."""
    return [
        ([make_batch(2, seed=1), make_batch(1, seed=2)], [make_batch(3, seed=3)]),
        ([make_batch(1, seed=4)], [make_batch(2, seed=5)]),
        ([make_batch(3, seed=7), make_batch(1, seed=8), make_batch(2, seed=6)], [make_batch(1, seed=9)]),
    ]


def assert_same_states(a, b, exact=True):
    ta, ma = flatten_state(a)
    tb, mb = flatten_state(b)
    assert ma == mb
    for k in ta:
        if exact:
            assert torch.equal(ta[k], tb[k]), k
        else:
            torch.testing.assert_close(ta[k], tb[k], rtol=1e-5, atol=1e-6, msg=k)


def test_two_ranks_equal_one_rank_on_the_concatenated_batch():
    batches = step_batches()
    per_rank = [([r0 for r0, _ in batches],), ([r1 for _, r1 in batches],)]
    results, calls = run_ranks(lambda comm, b: train(comm, b, make_stateful_objective, 3), per_rank)
    (s0, m0), (s1, m1) = results
    assert_same_states(s0, s1)  # the ranks stay replicated, bitwise

    # one rank, the same micro-batches in rank order: the sums are added in the same order
    one, m_one = train(LOCAL, [r0 + r1 for r0, r1 in batches], make_stateful_objective, 3)
    assert_same_states(s0, one)
    for a, b in zip(m0, m_one):
        assert a.keys() == b.keys()
        for name in a:
            assert torch.equal(a[name], b[name]), name
    assert m0[0]["n_seq"].item() == 6.0  # metric sums cover both ranks

    # one rank, one concatenated micro-batch per step: the same update up to rounding
    big, m_big = train(LOCAL, [[concat(r0 + r1)] for r0, r1 in batches], make_stateful_objective, 3)
    assert_same_states(s0, big, exact=False)
    torch.testing.assert_close(m0[-1]["loss"], m_big[-1]["loss"], rtol=1e-6, atol=0)

    # per step: the counts, prepare's statistics, the one flat gradient, the loss + metric sums
    n_params = sum(t.numel() for t in init_params().values(True, True))
    assert calls[:4] == [((1,), torch.int64), ((2,), torch.float64), ((n_params,), torch.float32), ((2,), torch.float32)]
    assert len(calls) == 4 * 3


def test_a_rank_alone_is_not_the_global_result():
    """The fake comm is not vacuous: without the reduction, rank 0's update differs (two steps:
    Adam's first update is nearly sign(g) and barely sees the gradient's size)."""
    batches = step_batches()
    alone, m_alone = train(LOCAL, [r0 for r0, _ in batches], make_stateful_objective, 2)
    results, _ = run_ranks(lambda comm, b: train(comm, b, make_stateful_objective, 2),
                           [([r0 for r0, _ in batches],), ([r1 for _, r1 in batches],)])
    (s0, m0), _ = results
    assert not torch.equal(alone.params["head", "bias"], s0.params["head", "bias"])
    assert m0[0]["loss"] != m_alone[0]["loss"] and m0[0]["n_tokens"] > m_alone[0]["n_tokens"]


def test_evaluate_over_two_ranks_equals_one():
    batches = [make_batch(2, seed=1), make_batch(1, seed=2), make_batch(3, seed=3), make_batch(1, seed=4)]
    params, objective = init_params(), make_objective()
    results, _ = run_ranks(lambda comm, b: evaluate(objective, params, init_extra(), b, comm=comm),
                           [(batches[:2],), (batches[2:],)])
    one = evaluate(objective, params, init_extra(), batches)
    assert results[0] == results[1] == pytest.approx(one, rel=1e-6)


class DoublingComm:
    """Rank ``rank`` of two whose partner holds identical data: the sum is twice the tensor."""

    def __init__(self, rank):
        self.rank, self.world_size = rank, 2

    def sum_(self, tensor):
        return tensor.mul_(2)


def test_the_per_step_rng_folds_in_the_rank():
    def loss(params, extra, batch, scale):
        out, sums, _ = make_objective().loss(params, extra, batch, scale)
        return out, sums, {"draw": torch.rand(())}

    draws = {}
    for rank in (0, 1):
        step = make_train_step(Objective(make_objective().count, loss), CFG, SCHED, comm=DoublingComm(rank))
        state = init_train_state(init_params(), CFG, seed=11)
        for s in range(2):
            state, m = step(state, [make_batch(1, seed=s)])
            with seeded(step_seed(11, s, rank)):
                expected = 2 * torch.rand(())  # summed over the two (identical) ranks
            assert torch.equal(m["draw"], expected), (rank, s)
            draws[rank, s] = m["draw"].item()
    assert draws[0, 0] != draws[1, 0] and draws[0, 1] != draws[1, 1]


def test_local_comm_is_the_identity_and_a_comm():
    t = torch.arange(3.0)
    assert LOCAL.sum_(t) is t and torch.equal(t, torch.arange(3.0))
    assert (LOCAL.rank, LOCAL.world_size) == (0, 1) and LocalComm() == LOCAL
    assert isinstance(LOCAL, Comm) and isinstance(DoublingComm(1), Comm)
