"""What each rank of the distributed tests runs (imported by the spawned processes).

`objectives_match` builds, on every rank, an unsharded reference base and an FSDP2-sharded
copy of the same base, and checks that the sharded step on this rank's share of the
micro-batches, reduced through the process-group Comm, gives the single-process loss and
gradients on the whole batch — for the NTP, MTP (sequential heads, also checkpointed), Rho-1 (step-wide
selection) and verifiable (running whitening statistics) objectives — and that several steps
leave identical params on every rank, equal to the single-process run's.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.distributed as dist
from tensordict import TensorDict

from tests.adapters.helpers import randomize, rel_err
from tests.objectives.test_mtp_objective import micro_batches, mtp_base, params_for
from tests.objectives.test_verifiable_objective import steps_batches
from safetensors.torch import load_file

from wmtp_fn.adapters import AdapterSpec, export_merged, init, install_slots
from wmtp_fn.dist.comm import GroupComm, check_replicated, tensor_hash
from wmtp_fn.dist.sampler import shard
from wmtp_fn.dist.shard import is_sharded
from wmtp_fn.models.base import Base, load_base
from wmtp_fn.models.mtp import mtp_from_llama
from wmtp_fn.models.prepare import prepare
from wmtp_fn.models.value_head import ValueHeadSpec, init_value_head
from wmtp_fn.objectives.mtp import mtp_objective
from wmtp_fn.objectives.ntp import ntp_objective
from wmtp_fn.objectives.rho1 import Reference, rho1_objective
from wmtp_fn.objectives.verifiable import initial_extra, verifiable_objective
from wmtp_fn.schedule import ScheduleConfig
from wmtp_fn.train import adamw
from wmtp_fn.train.state import init_train_state
from wmtp_fn.train.step import accumulate_grads, make_train_step

TOL = 1e-5
CFG = adamw.AdamWConfig(lr=1e-2, weight_decay=0.1, max_grad_norm=1.0)
SCHED = ScheduleConfig(kind="cosine", warmup_steps=1, total_steps=6)


def init_group(rank: int, world: int, port: int) -> GroupComm:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    return GroupComm(rank, world)


def sharded(module, kind: str, mode: str = "full") -> Base:
    return prepare(Base.of(module, kind), shard=mode)


def ntp_batches(step: int, n: int = 4) -> list[dict[str, torch.Tensor]]:
    """`n` micro-batches of unequal lengths and prompt masks, different per step."""
    gen = torch.Generator().manual_seed(100 + step)
    out = []
    for i in range(n):
        t = 9 + 2 * i
        ids = torch.randint(4, 128, (2, t), generator=gen)
        labels = ids.clone()
        labels[:, : 1 + i % 3] = -100
        labels[1, t - i :] = -100
        out.append({"input_ids": ids, "labels": labels})
    return out


REPORT: dict[str, float] = {}  # check -> the largest relative error seen, written for the test


def check_same(got, ref, what: str) -> None:
    loss_err = abs(float(got.loss) - float(ref.loss)) / abs(float(ref.loss))
    assert loss_err <= TOL, (what, float(got.loss), float(ref.loss))
    assert torch.equal(got.counts, ref.counts), what
    errs = [loss_err]
    for (key, g), (_, r) in zip(got.grads.items(True, True), ref.grads.items(True, True)):
        errs.append(rel_err(g, r))
        assert r.abs().sum() > 0 and errs[-1] <= TOL, (what, key, errs[-1])
    REPORT[what] = max(errs)


def leaves(td: TensorDict) -> list[torch.Tensor]:
    return list(td.values(include_nested=True, leaves_only=True))


def train(objective, params, extra, steps, comm=None):
    step_fn = make_train_step(objective, CFG, SCHED, comm=comm)
    state = init_train_state(params.clone(), CFG, seed=0, extra=extra)
    for mbs in steps:
        state, _ = step_fn(state, mbs)
    return state


def objectives_match(rank: int, world: int, port: int, tiny_dir: str, out_dir: str) -> None:
    """The checks of the module docstring; writes `out_dir/rank<r>.json` (`REPORT`) when all pass."""
    comm = init_group(rank, world, port)
    mine = lambda mbs: shard(mbs, rank, world)  # noqa: E731

    # NTP on a sharded causal LM: the decoder layers, embedding and norm are DTensors, the
    # unembedding stays plain; DoRA's initial magnitudes read the full weights.
    ref_llama = load_base(tiny_dir)
    install_slots(ref_llama)
    sh = sharded(load_base(tiny_dir), "causal_lm")
    q = sh.module.model.layers[0].self_attn.q_proj.weight
    assert is_sharded(q) and q.to_local().shape[0] == q.shape[0] // world
    assert is_sharded(sh.module.model.embed_tokens.weight) and not is_sharded(sh.module.lm_head.weight)
    assert sh.fingerprint == Base.of(ref_llama, "causal_lm").fingerprint
    dora_ref, _ = init(ref_llama, AdapterSpec(rank=2, alpha=4.0, use_dora=True), seed=3)
    dora_sh, _ = init(sh, AdapterSpec(rank=2, alpha=4.0, use_dora=True), seed=3)
    assert all(torch.equal(a, b) for a, b in zip(leaves(dora_sh), leaves(dora_ref)))

    adapter, spec = init(ref_llama, AdapterSpec(rank=4, alpha=8.0), seed=0)
    params = TensorDict({"lora": randomize(adapter, 2)}, batch_size=[])
    mbs = ntp_batches(0)
    ref_obj = ntp_objective(ref_llama, spec, chunk_size=8)
    ref = accumulate_grads(ref_obj, params, TensorDict(), mbs)
    for _ in range(2):  # a second step on the same sharded module: the hooks reset between steps
        got = accumulate_grads(ntp_objective(sh.module, spec, chunk_size=8), params, TensorDict(), mine(mbs), comm=comm)
        check_same(got, ref, "ntp")
    # A merged export of the sharded base (every rank gathers, transformers writes on rank 0)
    # is the unsharded base's.
    dirs = [export_merged(m, params["lora"], spec, Path(out_dir) / name)
            for m, name in ((sh.module, "sharded"), (ref_llama, "plain"))]
    dist.barrier()
    merged = [load_file(d / "model.safetensors") for d in dirs]
    assert merged[0].keys() == merged[1].keys() and all(torch.equal(merged[0][k], merged[1][k]) for k in merged[1])
    rep = sharded(load_base(tiny_dir), "causal_lm", mode="replicate")
    assert not is_sharded(rep.module.model.layers[0].self_attn.q_proj.weight)
    got = accumulate_grads(ntp_objective(rep.module, spec, chunk_size=8), params, TensorDict(), mine(mbs), comm=comm)
    check_same(got, ref, "ntp, replicate")

    # NTP, several steps: every rank ends with the same params, the single-process ones.
    steps = [ntp_batches(s) for s in range(3)]
    one = train(ref_obj, params, TensorDict(), steps)
    many = train(ntp_objective(sh.module, spec, chunk_size=8), params, TensorDict(), [mine(s) for s in steps], comm)
    check_replicated(leaves(many.params), comm)
    REPORT["ntp, 3 steps"] = max(rel_err(a, b) for a, b in zip(leaves(many.params), leaves(one.params)))
    assert REPORT["ntp, 3 steps"] <= TOL
    assert not torch.equal(leaves(many.params)[0], leaves(params)[0])  # the steps did move them

    # MTP, sequential heads (each head its own backward through the sharded head layer).
    ref_mtp = mtp_base(tiny_dir, 3)
    sh_mtp = sharded(mtp_base(tiny_dir, 3), "mtp")
    assert is_sharded(sh_mtp.module.extra_heads[1].mlp.down_proj.weight)
    policy, pspec = params_for(ref_mtp)
    mbs = micro_batches()
    ref = accumulate_grads(mtp_objective(ref_mtp, pspec, chunk_size=8), policy, TensorDict(), mbs)
    got = accumulate_grads(mtp_objective(sh_mtp.module, pspec, chunk_size=8), policy, TensorDict(), mine(mbs), comm=comm)
    check_same(got, ref, "mtp")
    sh_ac = sharded(mtp_base(tiny_dir, 3, checkpointing=True), "mtp")  # recomputed layers re-gather in backward
    got = accumulate_grads(mtp_objective(sh_ac.module, pspec, chunk_size=8), policy, TensorDict(), mine(mbs), comm=comm)
    check_same(got, ref, "mtp, checkpointed")

    # Rho-1 with the step-wide selection (a global k-th excess over both ranks' tokens).
    ref_adapter, ref_spec = init(ref_llama, AdapterSpec(rank=2, alpha=4.0), seed=1)
    reference = Reference(randomize(ref_adapter, seed=9), ref_spec)
    kw = dict(reference=reference, ratio=0.6, scope="step", chunk_size=8)
    ref = accumulate_grads(rho1_objective(ref_mtp, pspec, **kw), policy, TensorDict(), mbs)
    got = accumulate_grads(rho1_objective(sh_mtp.module, pspec, **kw), policy, TensorDict(), mine(mbs), comm=comm)
    check_same(got, ref, "rho1")
    assert torch.equal(got.metrics["selected"], ref.metrics["selected"])

    # Verifiable: TD weights from a critic, whitened by running statistics reduced over ranks.
    def verifiable_setup():
        mtp = mtp_from_llama(load_base(tiny_dir), 2)
        gen = torch.Generator().manual_seed(5)
        with torch.no_grad():
            for p in mtp.extra_heads.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
        install_slots(mtp)
        return mtp

    ref_v, sh_v = verifiable_setup(), sharded(verifiable_setup(), "mtp").module
    pol, vspec = init(ref_v, AdapterSpec(rank=4, alpha=8.0), seed=0)
    crit, cspec = init(ref_v, AdapterSpec(rank=4, alpha=8.0, layers=(0,)), seed=1)
    critic = TensorDict({"critic": randomize(crit, 2), "value_head": randomize(init_value_head("mlp", 64, seed=3), 4, scale=0.5)},
                        batch_size=[])
    vparams = TensorDict({"policy": randomize(pol, 6, scale=0.1)}, batch_size=[])
    head = ValueHeadSpec("mlp", 64)
    ref_obj = verifiable_objective(ref_v, vspec, critic, cspec, head)
    sh_obj = verifiable_objective(sh_v, vspec, critic, cspec, head)
    batches = steps_batches()
    ref = accumulate_grads(ref_obj, vparams, initial_extra(), batches[0])
    got = accumulate_grads(sh_obj, vparams, initial_extra(), mine(batches[0]), comm=comm)
    check_same(got, ref, "verifiable")
    one = train(ref_obj, vparams, initial_extra(), batches)
    many = train(sh_obj, vparams, initial_extra(), [mine(b) for b in batches], comm)
    check_replicated(leaves(many.params) + leaves(many.extra), comm, what="params and whitening statistics")
    REPORT["verifiable, 4 steps"] = max(rel_err(a.double(), b.double()) for a, b in
                                        zip(leaves(many.params) + leaves(many.extra), leaves(one.params) + leaves(one.extra)))
    assert REPORT["verifiable, 4 steps"] <= TOL
    assert int(many.extra["whitening", "updates"]) == len(batches)

    # A rank that drifts is caught.
    drifted = [t.clone() for t in leaves(many.params)]
    if rank == 1:
        drifted[0].view(-1)[0] = torch.nextafter(drifted[0].view(-1)[0], torch.tensor(1.0))
    assert tensor_hash(drifted).item() != tensor_hash(leaves(many.params)).item() or rank == 0
    try:
        check_replicated(drifted, comm)
    except RuntimeError as e:
        assert "rank(s) [1]" in str(e)
    else:
        raise AssertionError("a one-ulp difference on rank 1 went unnoticed")
    dist.destroy_process_group()
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(REPORT))
