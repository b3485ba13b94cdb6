"""The FSDP2 step benchmark runs on CPU (tiny shape, a one-rank gloo group it starts itself)
and its two variants agree. Timings are never asserted: they are measured on the GPU."""

import importlib.util
import json
import os
import sys
from pathlib import Path

import torch.distributed as dist

SCRIPT = Path(__file__).resolve().parents[2] / "experiments" / "bench" / "fsdp_step.py"


def test_bench_runs_on_cpu_and_both_paths_give_the_same_loss(tmp_path, monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.setenv(key, "")  # recorded, so the script's own values are undone after the test
        monkeypatch.delenv(key)  # the script sets them for its own one-rank group
    spec = importlib.util.spec_from_file_location("fsdp_step_bench", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench
    spec.loader.exec_module(bench)
    out = bench.main(["--shape", "tiny", "--device", "cpu", "--batch", "2", "--seq", "32", "--warmup", "1",
                      "--repeats", "1", "--block", "1", "--json", str(tmp_path / "r.json")])
    assert [r["variant"] for r in out["rows"]] == ["plain", "fsdp"]
    assert all(r["ms"] > 0 and r["tokens_per_s"] > 0 for r in out["rows"])
    assert out["first_loss"]["plain"] > 0 and out["loss_rel_diff"] < 1e-6
    assert json.loads((tmp_path / "r.json").read_text())["ratio"]["tokens_per_s"] > 0
    assert not dist.is_initialized()  # the script leaves the group it started
    assert os.environ["WORLD_SIZE"] == "1"  # (undone by monkeypatch: later tests are not "launched")
