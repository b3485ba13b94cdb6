"""The process-group pieces of `dist.comm`: the exact-bits hash, the one-hot gather, the
replication check and its step wrapper (on the thread-backed fake Comm of `tests.train`),
and the launch detection with a real one-rank gloo group."""

from __future__ import annotations

import socket
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.distributed as dist
from hypothesis import given
from hypothesis import strategies as st
from tensordict import TensorDict

from tests.train.test_comm import run_ranks
from wmtp_fn.dist.comm import (
    LOCAL, GroupComm, backend_for, barrier, check_replicated, gathered, launched, process_comm, rank_device,
    replicas_checked, shutdown, tensor_hash,
)

MESSAGE = ("the {what} differ across ranks (rank(s) {ranks} disagree with rank 0); every rank must apply the same "
           "update: was a rank given another checkpoint, seed or batch?")


def hash_by_hand(tensors: list[torch.Tensor]) -> int:
    """The documented hash in Python integers: each tensor's bytes as little-endian words of
    its element width (4 bytes for 8-byte dtypes), word k weighted by 2·0x9E3779B1·k + 1, the
    parts mixed as h·1_000_003 + part + i, all modulo 2**64, read back as a signed int64."""
    h = 0
    for i, t in enumerate(tensors):
        raw = t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        width = {2: 2, 1: 1}.get(t.element_size(), 4)
        words = np.frombuffer(raw, dtype={4: "<i4", 2: "<i2", 1: "u1"}[width]).tolist()
        part = sum(w * (2 * 0x9E3779B1 * k + 1) for k, w in enumerate(words))
        h = (h * 1_000_003 + part + i) % 2**64
    return h - 2**64 if h >= 2**63 else h


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


def test_hash_is_the_documented_one_by_hand():
    gen = torch.Generator().manual_seed(3)
    tensors = [torch.randn(5, 3, generator=gen) * 1e3, torch.randn(7, generator=gen).to(torch.bfloat16),
               torch.randn(4, generator=gen, dtype=torch.float64), torch.arange(200, 206, dtype=torch.uint8)]
    assert tensor_hash(tensors).item() == hash_by_hand(tensors)
    assert tensor_hash(tensors[:1]).item() == hash_by_hand(tensors[:1])


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
    for odd, want in ((2, [2]), (1, [1]), (0, [1, 2])):
        tensors = [(other if r == odd else same.clone(),) for r in range(3)]
        with pytest.raises(RuntimeError) as got:
            run_ranks(lambda comm, t: check_replicated([t], comm, what="weights"), tensors)
        assert str(got.value) == MESSAGE.format(what="weights", ranks=want)
    with pytest.raises(RuntimeError) as got:
        run_ranks(lambda comm, t: check_replicated([t], comm), [(same,), (other,)])
    assert str(got.value) == MESSAGE.format(what="params", ranks=[1])
    check_replicated([other], LOCAL)  # one rank: nothing to compare


def test_replicas_checked_runs_the_check_every_n_steps():
    def step_fn(state, mbs):  # each rank moves a nested leaf by its own amount: they drift apart
        params = state.params.clone()
        params["lora", "w"] += mbs
        return SimpleNamespace(params=params, step=state.step + 1), {}

    def run(comm, delta):
        step = replicas_checked(step_fn, comm, 3)
        params = TensorDict({"lora": {"w": torch.zeros(2)}, "head": torch.ones(3)}, batch_size=[])
        state = SimpleNamespace(params=params, step=0)
        for _ in range(3):
            state, _ = step(state, delta)
            if state.step < 3:
                assert state.params["lora", "w"][0] == delta * state.step  # not checked before step 3
        return state

    with pytest.raises(RuntimeError) as got:
        run_ranks(run, [(1.0,), (2.0,)])
    assert str(got.value) == MESSAGE.format(what="trainable params after step 3", ranks=[1])
    done, _ = run_ranks(run, [(1.0,), (1.0,)])
    assert [s.step for s in done] == [3, 3]
    assert replicas_checked(step_fn, SimpleNamespace(world_size=2), 0) is step_fn
    assert replicas_checked(step_fn, LOCAL, 5) is step_fn
    with pytest.raises(ValueError, match=r"dist.check_every must be >= 0, got -1"):
        replicas_checked(step_fn, LOCAL, -1)


def test_barrier_meets_every_rank():
    ranks, calls = run_ranks(lambda comm: barrier(comm), [(), ()])
    assert calls == [((1,), torch.float32)]
    _, calls = run_ranks(lambda comm: barrier(comm), [()])
    assert calls == []  # one rank: no collective at all


def test_each_rank_computes_on_its_own_gpu_and_the_backend_suits_the_device():
    assert rank_device(torch.device("cuda"), 3) == torch.device("cuda", 3)
    assert rank_device(torch.device("cuda", 0), 1) == torch.device("cuda", 1)
    assert rank_device(torch.device("cpu"), 2) == torch.device("cpu")
    assert backend_for(torch.device("cuda", 1)) == "nccl" and backend_for(torch.device("cpu")) == "gloo"


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
