"""Two CPU processes (gloo) with an FSDP2-sharded base give the single-process loss,
gradients and params (the checks are in `workers.objectives_match`)."""

from __future__ import annotations

import json
import socket

import torch.multiprocessing as mp

from tests.distributed.workers import objectives_match


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


CHECKS = {"ntp", "ntp, replicate", "ntp, 3 steps", "mtp", "mtp, checkpointed", "rho1", "verifiable", "verifiable, 4 steps"}


def test_sharded_objectives_equal_one_process(tiny_dir, tmp_path):
    mp.spawn(objectives_match, args=(2, free_port(), str(tiny_dir), str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):  # every check ran on both ranks, within 1e-5 of one process (fp32)
        report = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert set(report) == CHECKS and max(report.values()) <= 1e-5, report
