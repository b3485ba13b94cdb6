"""The process-group pieces of `dist.comm`: the exact-bits hash, the one-hot gather, the
replication check and its step wrapper (on the thread-backed fake Comm of `tests.train`),
and the launch detection with a real one-rank gloo group."""

from __future__ import annotations

import socket
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from hypothesis import given
from hypothesis import strategies as st

from tests.train.test_comm import run_ranks
from wmtp_fn.dist.comm import (
    LOCAL, GroupComm, barrier, check_replicated, gathered, launched, process_comm, replicas_checked, shutdown,
    tensor_hash,
)


def flip_bit(t: torch.Tensor, index: int, bit: int) -> torch.Tensor:
    """`t` with bit `bit` of the `index`-th element's bytes flipped."""
    out = t.clone()
    raw = out.view(torch.uint8).reshape(-1)
    raw[index * t.element_size() + bit // 8] ^= 1 << (bit % 8)
    return out


@given(st.integers(0, 11), st.integers(0, 31), st.sampled_from([0, 1]))
def test_hash_sees_every_bit_of_every_tensor(index, bit, which):
    gen = torch.Generator().manual_seed(0)
    tensors = [torch.randn(12, generator=gen), torch.randn(3, 4, generator=gen)]
    changed = list(tensors)
    changed[which] = flip_bit(tensors[which].reshape(-1), index, bit).reshape(tensors[which].shape)
    assert tensor_hash([t.clone() for t in tensors]) == tensor_hash(tensors)
    assert tensor_hash(changed) != tensor_hash(tensors)


def test_hash_covers_other_dtypes_and_the_order_of_tensors():
    a, b = torch.arange(6, dtype=torch.float32), torch.ones(4, dtype=torch.bfloat16)
    assert tensor_hash([a, b]) != tensor_hash([b, a])
    for t in (b, a.double(), torch.arange(5, dtype=torch.uint8)):
        assert tensor_hash([flip_bit(t, 1, 7)]) != tensor_hash([t])
    assert tensor_hash([]) == 0 and tensor_hash([a]).dtype == torch.int64
    assert tensor_hash([a[::2]]) == tensor_hash([a[::2].contiguous()])  # values, not strides


def test_gathered_is_every_rank_value_in_rank_order():
    ranks, calls = run_ranks(lambda comm, v: gathered(torch.tensor(v), comm), [(11,), (-5,), (7,)])
    for got in ranks:
        assert got.tolist() == [11, -5, 7]
    assert calls == [((3,), torch.int64)]


def test_check_replicated_passes_equal_params_and_names_the_rank_that_differs():
    same = torch.linspace(-1, 1, 9)
    run_ranks(lambda comm, t: check_replicated([t], comm), [(same,), (same.clone(),), (same.clone(),)])
    other = same.clone()
    other[4] = torch.nextafter(other[4], torch.tensor(2.0))
    with pytest.raises(RuntimeError, match=r"the params differ across ranks \(rank\(s\) \[2\] disagree with rank 0\)"):
        run_ranks(lambda comm, t: check_replicated([t], comm), [(same,), (same.clone(),), (other,)])
    check_replicated([other], LOCAL)  # one rank: nothing to compare


def test_replicas_checked_runs_the_check_every_n_steps():
    def step_fn(state, mbs):  # each rank moves its params by its own amount: they drift apart
        p = state.params["w"] + mbs
        return SimpleNamespace(params=TensorDictLike(w=p), step=state.step + 1), {}

    def run(comm, delta):
        step = replicas_checked(step_fn, comm, 3)
        state = SimpleNamespace(params=TensorDictLike(w=torch.zeros(2)), step=0)
        for _ in range(3):
            state, _ = step(state, delta)
            if state.step < 3:
                assert state.params["w"][0] == delta * state.step  # not checked before step 3
        return state

    with pytest.raises(RuntimeError, match=r"trainable params after step 3 differ"):
        run_ranks(run, [(1.0,), (2.0,)])
    done, _ = run_ranks(run, [(1.0,), (1.0,)])
    assert [s.step for s in done] == [3, 3]
    assert replicas_checked(step_fn, SimpleNamespace(world_size=2), 0) is step_fn
    assert replicas_checked(step_fn, LOCAL, 5) is step_fn
    with pytest.raises(ValueError, match=r"dist.check_every must be >= 0, got -1"):
        replicas_checked(step_fn, LOCAL, -1)


class TensorDictLike(dict):
    """The two TensorDict methods `replicas_checked` reads."""

    def values(self, include_nested=False, leaves_only=False):
        return list(super().values())


def test_barrier_meets_every_rank():
    ranks, calls = run_ranks(lambda comm: barrier(comm), [(), ()])
    assert calls == [((1,), torch.float32)]
    barrier(LOCAL)  # one process: no collective at all


def test_an_unlaunched_process_is_local_and_a_launched_one_joins_the_group(monkeypatch):
    for key in ("WORLD_SIZE", "RANK"):
        monkeypatch.delenv(key, raising=False)
    assert not launched()
    assert process_comm(torch.device("cpu")) == (LOCAL, torch.device("cpu"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert not launched()  # RANK too, as torchrun sets both
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(port))):
        monkeypatch.setenv(key, value)
    assert launched()
    try:
        comm, device = process_comm(torch.device("cpu"))
        assert comm == GroupComm(0, 1) and device == torch.device("cpu") and dist.get_backend() == "gloo"
        t = torch.tensor([1.5, -2.0])
        assert comm.sum_(t) is t and t.tolist() == [1.5, -2.0]
        assert process_comm(torch.device("cpu"))[0] == comm  # initialised once
    finally:
        shutdown()
    assert not dist.is_initialized()
    shutdown()  # nothing left to destroy: a no-op
