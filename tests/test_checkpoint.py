import subprocess
import sys
import textwrap

import pytest
import torch
from tensordict import TensorDict

from tests.adapters.helpers import randomize
from wmtp_fn.adapters import AdapterSpec, init, to_flat
from wmtp_fn.checkpoint import latest, load_adapter, load_params, read_checkpoint, save_params, save_step
from wmtp_fn.models.base import build_base, tiny_llama_config
from wmtp_fn.adapters import install_slots


@pytest.fixture
def adapter(base):
    ad, spec = init(base, AdapterSpec(rank=4, alpha=8.0, dropout=0.05, use_dora=True), seed=0)
    return randomize(ad, seed=1), spec


def test_params_round_trip_is_bitwise_and_checked(base, adapter, tmp_path):
    ad, spec = adapter
    head = TensorDict({"weight": torch.randn(1, 64), "bias": torch.zeros(1)}, batch_size=[])
    params = TensorDict({"lora": ad, "value_head": head}, batch_size=[])
    save_params(tmp_path / "ck", params, {"lora": spec}, meta={"metrics": {"val_loss": 1.5}})
    loaded, specs, meta = load_params(tmp_path / "ck")
    assert specs["lora"] == spec and meta["metrics"] == {"val_loss": 1.5} and meta["kind"] == "params"
    for k, v in to_flat(params).items():
        assert torch.equal(to_flat(loaded)[k], v), k
    got, got_spec = load_adapter(tmp_path / "ck", "lora", base)
    assert got_spec.base_fingerprint == spec.base_fingerprint
    assert to_flat(got).keys() == to_flat(ad).keys()
    assert all(torch.equal(to_flat(got)[k], v) for k, v in to_flat(ad).items())  # the adapter itself, on the base's device
    with pytest.raises(KeyError, match=r"no adapter named 'critic'; it has \['lora'\]"):
        load_adapter(tmp_path / "ck", "critic")


def test_loading_onto_another_base_fails_with_both_fingerprints(adapter, tmp_path):
    ad, spec = adapter
    save_params(tmp_path / "ck", TensorDict({"lora": ad}, batch_size=[]), {"lora": spec})
    other = build_base(tiny_llama_config(vocab_size=128), seed=77)
    install_slots(other)
    with pytest.raises(ValueError, match="made for a different base"):
        load_adapter(tmp_path / "ck", "lora", other)


def test_corrupt_meta_is_a_clear_error(adapter, tmp_path):
    ad, spec = adapter
    path = save_params(tmp_path / "ck", TensorDict({"lora": ad}, batch_size=[]), {"lora": spec})
    (path / "meta.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"meta.json: invalid JSON"):
        read_checkpoint(path)


def test_keep_prunes_old_steps(tmp_path):
    for step in range(5):
        save_step(tmp_path, step, {"params": {"x": torch.full((2,), float(step))}}, {"step": step}, keep=2)
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_00000003", "step_00000004"]
    tensors, meta = read_checkpoint(latest(tmp_path))
    assert meta["step"] == 4 and torch.equal(tensors["params"]["x"], torch.full((2,), 4.0))


def test_a_write_killed_midway_leaves_the_previous_checkpoint_loadable(tmp_path):
    """A real SIGKILL in the middle of writing step 2's tensors."""
    script = textwrap.dedent(f"""
        import os, signal, torch, safetensors.torch
        from wmtp_fn import checkpoint
        root = {str(tmp_path)!r}
        checkpoint.save_step(root, 1, {{"params": {{"x": torch.ones(1000)}}}}, {{"step": 1}})
        def dying_save(tensors, filename, metadata=None):
            with open(filename, "wb") as f:
                f.write(b"half a file")
                f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        checkpoint.save_file = dying_save
        checkpoint.save_step(root, 2, {{"params": {{"x": torch.zeros(1000)}}}}, {{"step": 2}})
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr
    assert (tmp_path / "latest").read_text().strip() == "step_00000001"
    assert not (tmp_path / "step_00000002").exists()
    tensors, meta = read_checkpoint(latest(tmp_path))
    assert meta["step"] == 1 and torch.equal(tensors["params"]["x"], torch.ones(1000))
    assert list(tmp_path.glob(".step_00000002.tmp-*"))  # the torn write stayed a temporary
    save_step(tmp_path, 3, {"params": {"x": torch.zeros(3)}}, {"step": 3})
    assert not list(tmp_path.glob(".step_*.tmp-*"))  # cleaned up by the next save


def test_a_resave_killed_between_its_renames_is_recovered(tmp_path):
    """Re-saving step 1 (e.g. on Ctrl-C): the old copy is renamed aside, then SIGKILL."""
    script = textwrap.dedent(f"""
        import os, signal, torch
        from wmtp_fn import atomic, checkpoint
        root = {str(tmp_path)!r}
        checkpoint.save_step(root, 1, {{"params": {{"x": torch.ones(4)}}}}, {{"step": 1}})
        real_rename = os.rename
        def dying_rename(src, dst):
            real_rename(src, dst)
            if ".old-" in str(dst):
                os.kill(os.getpid(), signal.SIGKILL)
        atomic.os.rename = dying_rename
        checkpoint.save_step(root, 1, {{"params": {{"x": torch.zeros(4)}}}}, {{"step": 1}})
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr
    assert not (tmp_path / "step_00000001").exists()  # the window the crash hit
    tensors, meta = read_checkpoint(latest(tmp_path))  # readers put the old copy back
    assert meta["step"] == 1 and torch.equal(tensors["params"]["x"], torch.ones(4))
    assert not list(tmp_path.glob(".step_00000001.old-*"))
