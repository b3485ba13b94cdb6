"""Atomic files get the permissions a plain open() would give them, not mkstemp's 0600."""

import os
import stat

import pytest
import torch

from wmtp_fn.atomic import atomic_dir, atomic_file, atomic_write_text


@pytest.fixture(params=[0o022, 0o002, 0o077])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_atomic_files_respect_the_umask(tmp_path, umask):
    plain = tmp_path / "plain.txt"
    plain.write_text("x")  # what an ordinary write gives, the independent reference
    atomic_write_text(tmp_path / "config.json", "{}\n")
    with atomic_file(tmp_path / "adapter.pt") as tmp:
        torch.save({"x": torch.ones(2)}, tmp)
    assert mode(plain) == 0o666 & ~umask
    assert mode(tmp_path / "config.json") == mode(plain)
    assert mode(tmp_path / "adapter.pt") == mode(plain)
    atomic_write_text(tmp_path / "config.json", "{}\n")  # replacing keeps it so
    assert mode(tmp_path / "config.json") == mode(plain)


def test_atomic_directories_respect_the_umask(tmp_path, umask):
    (tmp_path / "plain").mkdir()
    with atomic_dir(tmp_path / "ck") as tmp:
        (tmp / "meta.json").write_text("{}")
    assert mode(tmp_path / "ck") == mode(tmp_path / "plain") == 0o777 & ~umask
    assert mode(tmp_path / "ck" / "meta.json") == 0o666 & ~umask
