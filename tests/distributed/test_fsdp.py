"""Two CPU processes (gloo) with an FSDP2-sharded base give the single-process loss,
gradients and params (the checks are in `workers.objectives_match`)."""

from __future__ import annotations

import socket

import torch.multiprocessing as mp

from tests.distributed.workers import objectives_match


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sharded_objectives_equal_one_process(tiny_dir):
    mp.spawn(objectives_match, args=(2, free_port(), str(tiny_dir)), nprocs=2, join=True)
