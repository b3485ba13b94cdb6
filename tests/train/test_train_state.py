"""TrainState flattening, per-step seeds, the skip counter, and bitwise resume (in memory and
through a real checkpoint), with ``extra`` run state updated by ``prepare`` every step."""

import json
from dataclasses import replace

import pytest
import torch
from tensordict import TensorDict

from tests.train.host_sync import HostSyncCounter
from tests.train.train_toy_lm import init_extra, init_params, make_batch, make_objective, make_stateful_objective
from wmtp_fn.data.sampling import Cursor
from wmtp_fn.checkpoint import restore_run, save_run
from wmtp_fn.train import adamw
from wmtp_fn.train.rng import _splitmix64, seeded, step_seed
from wmtp_fn.schedule import ScheduleConfig
from wmtp_fn.train.state import FORMAT, TrainState, flatten_state, init_train_state, unflatten_state
from wmtp_fn.train.step import make_train_step
from wmtp_fn.train.tree import leaf_keys

SCHED = ScheduleConfig(kind="linear", warmup_steps=2, total_steps=8, min_lr_ratio=0.2)
CFG = adamw.AdamWConfig(lr=1e-2, weight_decay=0.1, lr_multipliers={"lora_B": 4.0})


def test_splitmix64_reference_vectors():
    """Independent golden values: SplitMix64's published outputs (seed 0 -> 0xE220A8397B1DCDAF;
    seed 1234567 -> the sequence in the xoshiro/rand_xoshiro test vectors)."""
    golden, mask = 0x9E3779B97F4A7C15, (1 << 64) - 1
    assert _splitmix64(0) == 0xE220A8397B1DCDAF
    assert [_splitmix64((1234567 + i * golden) & mask) for i in range(5)] == [
        6457827717110365317, 3203168211198807973, 9817491932198370423, 4593380528125082431, 16408922859458223821,
    ]


def test_step_seed_pinned_values():
    # Regression pins: changing step_seed silently changes the randomness of every resumed run.
    # Rank 0 keeps the single-process values (the README demo's numbers depend on them).
    assert [step_seed(0, 0), step_seed(0, 1), step_seed(42, 7)] == [
        6017775124710473527, 313702574736366215, 793502930448478848,
    ]
    assert step_seed(42, 7, 0) == step_seed(42, 7)
    # rank r > 0: one more SplitMix64 round over (the 64-bit rank-0 value) ^ r
    full = _splitmix64(_splitmix64(42) ^ 7)
    assert step_seed(42, 7, 3) == _splitmix64(full ^ 3) >> 1


def test_step_seed_properties():
    seeds = {step_seed(r, s, k) for r in range(10) for s in range(100) for k in range(4)}
    assert len(seeds) == 10 * 100 * 4  # no collisions on a grid of nearby triples
    assert all(0 <= x < 2**63 for x in seeds)
    for bad in [(-1, 0), (0, -1), (0.5, 0), (True, 0), (0, 0, -1), (0, 0, True)]:
        with pytest.raises(ValueError):
            step_seed(*bad)


def test_seeded_restores_global_rng():
    torch.manual_seed(5)
    before = torch.get_rng_state()
    with seeded(step_seed(1, 2)):
        a = torch.rand(3)
    assert torch.equal(torch.get_rng_state(), before)
    with seeded(step_seed(1, 2)):
        b = torch.rand(3)
    assert torch.equal(a, b)


def fresh(seed=3):
    return init_train_state(init_params(), CFG, seed=seed, extra=init_extra())


def trained_state(steps=2):
    step = make_train_step(make_stateful_objective(dropout=0.3), CFG, SCHED)
    state = fresh()
    for s in range(steps):
        state, _ = step(state, [make_batch(2, seed=s)])
    return state, step


def assert_states_equal(a: TrainState, b: TrainState):
    ta, ma = flatten_state(a)
    tb, mb = flatten_state(b)
    assert ma == mb
    assert list(ta) == list(tb)
    for k in ta:
        assert ta[k].dtype == tb[k].dtype and torch.equal(ta[k], tb[k]), k


def test_flatten_names_and_roundtrip():
    state, _ = trained_state()
    tensors, meta = flatten_state(state)
    assert json.loads(json.dumps(meta)) == meta
    leaves = ["lora.proj.lora_A", "lora.proj.lora_B", "head.bias", "head.scale"]
    assert meta == {
        "format": FORMAT, "step": 2, "seed": 3, "tensors": ["consecutive_skips"],
        "trees": {"params": leaves, "opt_state": [f"{s}.{n}" for s in ("mu", "nu", "count") for n in leaves],
                  "extra": ["stats.ema", "stats.tokens_seen"]},
    }
    assert tensors["params.lora.proj.lora_A"] is state.params["lora", "proj", "lora_A"]  # live, not a copy
    assert tensors["opt_state.nu.head.bias"] is state.opt_state["nu", "head", "bias"]
    assert tensors["extra.stats.tokens_seen"].dtype == torch.float64
    assert float(tensors["extra.stats.tokens_seen"]) == 2 * 2 * 9  # prepare ran on both steps (2 x 9 tokens each)
    back = unflatten_state({k: v.clone() for k, v in reversed(tensors.items())}, json.loads(json.dumps(meta)))
    assert isinstance(back, TrainState)
    assert_states_equal(state, back)
    assert leaf_keys(back.opt_state) == leaf_keys(state.opt_state)  # leaf order restored, not the dict order


def test_unflatten_errors():
    state, _ = trained_state(1)
    tensors, meta = flatten_state(state)
    with pytest.raises(ValueError, match="format"):
        unflatten_state(tensors, {**meta, "format": "wmtp_fn.TrainState/1"})
    missing = dict(tensors)
    del missing["opt_state.nu.head.bias"]
    with pytest.raises(KeyError, match="opt_state.nu.head.bias"):
        unflatten_state(missing, meta)
    with pytest.raises(KeyError, match="'seed'"):
        unflatten_state(tensors, {k: v for k, v in meta.items() if k != "seed"})
    dotted_key = TensorDict({"a.b": torch.zeros(1)}, batch_size=[])
    with pytest.raises(ValueError, match="separator"):
        flatten_state(init_train_state(dotted_key, adamw.AdamWConfig(), seed=0))


def poisoned(seed):
    bad = make_batch(2, seed=seed)
    bad["poison"] = torch.tensor(float("nan"))
    return bad


def test_skip_counter_lives_in_the_state():
    """Consecutive skipped steps are counted on device; a good step resets the count; a skipped
    step leaves params, optimizer state and extra unchanged; the count survives unflatten."""
    step = make_train_step(make_stateful_objective(), CFG, SCHED)
    state = fresh()
    counts = []
    for s, batch in enumerate([make_batch(2, seed=0), poisoned(1), poisoned(2)]):
        before = {k: v.clone() for k, v in flatten_state(state)[0].items()}
        with HostSyncCounter() as counter:
            state, m = step(state, [batch])
        assert counter.syncs == 0  # the counter, prepare and the extra selection stay on device
        counts.append(int(state.consecutive_skips))
        if m["skipped"].item():
            after = flatten_state(state)[0]
            for k, v in before.items():
                if k != "consecutive_skips":
                    assert torch.equal(after[k], v), k
    assert counts == [0, 1, 2]
    tensors, meta = flatten_state(state)
    back = unflatten_state({k: v.clone() for k, v in tensors.items()}, meta)
    assert back.consecutive_skips.dtype == torch.int64 and int(back.consecutive_skips) == 2
    back, _ = step(back, [poisoned(3)])
    assert int(back.consecutive_skips) == 3
    back, _ = step(back, [make_batch(1, seed=4)])
    assert int(back.consecutive_skips) == 0


def test_prepare_changing_the_layout_of_extra_is_an_error():
    def prepare(params, extra, mbs, comm):
        return TensorDict({"new": torch.zeros(2)}, batch_size=[]), mbs

    base = make_objective()
    objective = type(base)(count=base.count, loss=base.loss, prepare=prepare)
    state = fresh()
    with pytest.raises(ValueError, match=r"changed the layout of extra.*init_train_state"):
        make_train_step(objective, CFG, SCHED)(state, [make_batch(1)])


def run_batches():
    """Steps with dropout on, unequal micro-batches, and a skipped step right before the save."""
    return [
        [make_batch(2, seed=10), make_batch(1, seed=20)],
        [make_batch(1, seed=11), poisoned(21)],
        [make_batch(2, seed=12), make_batch(3, seed=22)],
        [poisoned(13)],
        [make_batch(1, seed=14), make_batch(2, seed=24)],
    ]


def straight_run():
    batches = run_batches()
    state, step = trained_state(0)
    metrics = []
    for b in batches:
        state, m = step(state, b)
        metrics.append(m)
    return state, metrics


def test_resume_is_bitwise_identical():
    """5 uninterrupted steps == 2 steps, save (copy, keys sorted as in safetensors), load, 3 steps."""
    straight, metrics_straight = straight_run()
    batches = run_batches()
    resumed, step = trained_state(0)
    for b in batches[:2]:
        resumed, _ = step(resumed, b)
    assert int(resumed.consecutive_skips) == 1
    tensors, meta = flatten_state(resumed)
    saved = {k: tensors[k].clone() for k in sorted(tensors)}
    resumed = unflatten_state(saved, json.loads(json.dumps(meta)))
    for b, m_ref in zip(batches[2:], metrics_straight[2:]):
        resumed, m = step(resumed, b)
        assert m.keys() == m_ref.keys()
        for name in m_ref:
            assert torch.equal(m[name], m_ref[name]) or (m[name].isnan().all() and m_ref[name].isnan().all()), name
    assert resumed.step == straight.step == 5
    assert_states_equal(straight, resumed)


def test_resume_through_a_checkpoint_is_bitwise_identical(tmp_path):
    """The same through checkpoint.save_run / restore_run (safetensors + JSON on disk)."""
    straight, _ = straight_run()
    batches = run_batches()
    state, step = trained_state(0)
    for b in batches[:2]:
        state, _ = step(state, b)
    path = save_run(tmp_path, state, Cursor(seed=0), specs={}, config={}, info={}, keep=2)
    del state
    resumed, cursor, meta = restore_run(path, torch.device("cpu"))
    assert int(resumed.consecutive_skips) == 1 and resumed.extra["stats", "tokens_seen"].dtype == torch.float64
    assert meta["state"]["step"] == 2 and cursor == Cursor(seed=0)
    for b in batches[2:]:
        resumed, _ = step(resumed, b)
    assert_states_equal(straight, resumed)
    # the extra state is really threaded: a run that forgets it (fresh extra on resume) differs
    forgetful, _ = restore_run(path, torch.device("cpu"))[:2]
    forgetful = replace(forgetful, extra=init_extra())
    for b in batches[2:]:
        forgetful, _ = step(forgetful, b)
    assert not torch.equal(forgetful.params["head", "bias"], straight.params["head", "bias"])
