"""`dist.shard` in this process, on a real one-rank gloo group (`tests/distributed/test_fsdp.py`
checks the sharded objectives across two processes): which modules `fsdp_shard` shards, what a
unit's forward sees (parameters gathered in `param_dtype`, inputs not cast), resharding after
the forward as asked, `full_tensor` / `is_sharded`, and `check_mode`'s message."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule

from wmtp_fn.dist.shard import MODES, check_mode, fsdp_shard, full_tensor, is_sharded

CPU = torch.device("cpu")


@pytest.fixture
def group():
    """A one-rank gloo process group (an in-memory store: no port), destroyed afterwards."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


class Probe(nn.Module):
    """A linear (with a bias) that records, in its forward, its input's dtype, its weight's dtype
    and whether the weight is still sharded."""

    def __init__(self, n: int, seed: int):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.weight = nn.Parameter(torch.randn(n, n, generator=gen))
        self.bias = nn.Parameter(torch.randn(n, generator=gen))
        self.seen: list[tuple[torch.dtype, torch.dtype, bool]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [B, n]
        self.seen.append((x.dtype, self.weight.dtype, is_sharded(self.weight)))
        return x.to(self.weight.dtype) @ self.weight.T + self.bias.to(self.weight.dtype)


class Root(nn.Module):
    """`tied` shares its weight with `head`, which stays out of the sharding (as a tied
    embedding shares the ignored unembedding weight); `scale` is the root's own parameter."""

    def __init__(self, n: int = 4):
        super().__init__()
        self.tied, self.a, self.c = Probe(n, 0), Probe(n, 1), Probe(n, 2)
        self.head = nn.Linear(n, n, bias=False)
        self.tied.weight = self.head.weight
        self.scale = nn.Parameter(torch.ones(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * self.c(self.a(x))


def sharded(**kw) -> Root:
    root = Root()
    # the tied unit first: skipping it must not skip the units after it
    return fsdp_shard(root, [root.tied, root.a, root.c], device=CPU, ignored=[root.head.weight], **kw)


def test_every_unit_is_sharded_but_the_one_sharing_an_ignored_tensor(group):
    root = Root()
    want = {k: v.detach().clone() for k, v in root.state_dict().items()}
    assert fsdp_shard(root, [root.tied, root.a, root.c], device=CPU, ignored=[root.head.weight]) is root
    assert isinstance(root, FSDPModule) and isinstance(root.a, FSDPModule) and isinstance(root.c, FSDPModule)
    assert not isinstance(root.tied, FSDPModule)
    assert is_sharded(root.a.weight) and is_sharded(root.c.bias) and is_sharded(root.scale)
    assert not is_sharded(root.head.weight) and root.tied.weight is root.head.weight
    for name, t in root.state_dict().items():  # the values are the same, whole again through full_tensor
        whole = full_tensor(t)
        assert not is_sharded(whole) and torch.equal(whole, want[name]), name


def test_a_units_forward_sees_whole_weights_in_param_dtype_and_its_inputs_uncast(group):
    root = sharded(param_dtype=torch.bfloat16)
    x = torch.randn(3, 4)
    out = root.a(x)
    assert root.a.seen == [(torch.float32, torch.bfloat16, False)]
    assert out.dtype == torch.bfloat16
    assert root.a.weight.dtype == torch.float32  # the shard keeps the stored dtype
    # the root's own parameter too: `scale` in fp32 would promote the bf16 product to fp32
    assert root(x).dtype == torch.bfloat16
    assert root.a.seen[1] == (torch.float32, torch.bfloat16, False)  # the root does not cast its inputs either


def test_without_param_dtype_the_weights_are_gathered_in_their_own_dtype(group):
    root = sharded()
    root.a(torch.randn(3, 4))
    assert root.a.seen == [(torch.float32, torch.float32, False)]


@pytest.mark.parametrize("reshard", [True, False])
def test_units_and_root_reshard_after_the_forward_as_asked(group, reshard):
    """A unit called on its own (as the forward pieces call them) is not the root: its
    parameters are sharded again after its forward exactly when `reshard_after_forward`."""
    root = sharded(reshard_after_forward=reshard)
    root.a(torch.randn(3, 4))
    assert is_sharded(root.a.weight) == reshard
    assert is_sharded(root.c.weight)  # not called: still sharded
    root(torch.randn(3, 4))
    assert is_sharded(root.scale) == reshard and is_sharded(root.c.weight) == reshard


def test_full_tensor_of_a_plain_tensor_is_that_tensor():
    t = torch.arange(6.0)
    assert full_tensor(t) is t and not is_sharded(t)


def test_check_mode_returns_a_known_mode_and_names_the_key_otherwise():
    assert [check_mode(m) for m in MODES] == ["full", "replicate"]
    with pytest.raises(ValueError) as info:
        check_mode("half")
    assert str(info.value) == "dist.shard is 'half'; expected one of ('full', 'replicate')"
    with pytest.raises(ValueError, match=r"^train\.shard is 'x'; expected one of \('full', 'replicate'\)$"):
        check_mode("x", key="train.shard")
