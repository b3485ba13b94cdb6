"""Crashes in the middle of writing a file that must be replaced atomically: the `latest`
pointer, a run's config.json, the seeds' hf_lora checkpoint, and `atomic_write_text` itself.
After the crash the previous version must be intact (a plain write would leave half a file).
See tests/crash.py for how the crash is injected."""

import importlib.util
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from tests.crash import SimulatedCrash, crash_on_write, raise_crash
from wmtp_fn.adapters import AdapterSpec, from_flat, to_flat
from wmtp_fn.adapters.seeds_io import read_seed_checkpoint, save_hf_lora
from wmtp_fn.atomic import atomic_write_text
from wmtp_fn.checkpoint import latest, read_checkpoint, save_step
from wmtp_fn.pipelines.runner import start_run

ROOT = Path(__file__).resolve().parents[1]


def test_atomic_write_text_keeps_the_old_file_on_a_crash(tmp_path, monkeypatch):
    path = tmp_path / "notes.txt"
    atomic_write_text(path, "old contents\n")
    crash_on_write("NEW", raise_crash, monkeypatch.setattr)
    with pytest.raises(SimulatedCrash):
        atomic_write_text(path, "NEW contents " * 100)
    assert path.read_text() == "old contents\n"
    monkeypatch.undo()
    atomic_write_text(path, "NEW contents\n")
    assert path.read_text() == "NEW contents\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]  # no temporary left behind


def test_latest_pointer_survives_a_kill_while_it_is_replaced(tmp_path):
    """A real SIGKILL halfway through writing the new pointer (step 2's directory is complete)."""
    script = textwrap.dedent(f"""
        import torch
        from tests.crash import crash_on_write, sigkill
        from wmtp_fn.checkpoint import save_step
        root = {str(tmp_path)!r}
        save_step(root, 1, {{"params": {{"x": torch.ones(3)}}}}, {{"step": 1}})
        crash_on_write("step_00000002", sigkill)
        save_step(root, 2, {{"params": {{"x": torch.zeros(3)}}}}, {{"step": 2}})
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == -9, proc.stderr
    assert (tmp_path / "latest").read_text() == "step_00000001\n"
    tensors, meta = read_checkpoint(latest(tmp_path))
    assert meta["step"] == 1 and torch.equal(tensors["params"]["x"], torch.ones(3))


def run_config(out_dir, steps):
    spec = importlib.util.spec_from_file_location("ref_tuning_cfg", ROOT / "experiments" / "ref_tuning.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cfg = module.get_config()
    cfg.out_dir = str(out_dir)
    cfg.train.steps = steps
    return cfg


def test_run_config_json_survives_a_crash_while_it_is_replaced(tmp_path, monkeypatch):
    start_run(run_config(tmp_path, steps=11))
    before = (tmp_path / "config.json").read_text()
    assert json.loads(before)["train.steps"] == 11
    crash_on_write('"train.steps": 987654', raise_crash, monkeypatch.setattr)
    with pytest.raises(SimulatedCrash):
        start_run(run_config(tmp_path, steps=987654))
    assert (tmp_path / "config.json").read_text() == before


def test_hf_lora_file_survives_a_crash_while_it_is_replaced(tmp_path, monkeypatch):
    spec = AdapterSpec(rank=2, alpha=4.0, targets=("q_proj",))
    g = torch.Generator().manual_seed(0)
    old = from_flat({"model.layers.0.self_attn.q_proj.lora_A": torch.randn(2, 8, generator=g),
                     "model.layers.0.self_attn.q_proj.lora_B": torch.randn(8, 2, generator=g)})
    path = save_hf_lora(tmp_path / "adapter.hf_lora.pt", old, spec, base_model_path="/models/old")
    new = old.apply(lambda t: t + 1)
    crash_on_write("/models/new", raise_crash, monkeypatch.setattr)
    with pytest.raises(SimulatedCrash):
        save_hf_lora(path, new, spec, base_model_path="/models/new")
    monkeypatch.undo()
    ck = read_seed_checkpoint(path)
    assert ck.meta["base_model_path"] == "/models/old"
    for k, v in to_flat(old).items():
        assert torch.equal(to_flat(ck.adapter)[k], v), k
