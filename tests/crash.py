"""Simulated crashes in the middle of a file write, for the atomic-write tests.

`crash_on_write(marker, die)` wraps Python's file opening (`open`, `io.open`, which `Path`
uses) and `torch.save`: the first write whose data contains `marker` writes only the first half
of its bytes to the real file, flushes them to the OS, then calls `die()` — raise an exception
in-process, or SIGKILL the process (a real crash: no `finally`, no cleanup). The trigger is the
content, not the file name, so it fires whatever temporary name an atomic writer uses, and a
plain write into the destination leaves exactly the torn file a crash would.
"""

from __future__ import annotations

import builtins
import io
import os
import signal
from collections.abc import Callable

import torch


class SimulatedCrash(Exception):
    """The process 'died' here."""


def raise_crash() -> None:
    raise SimulatedCrash("simulated crash mid-write")


def sigkill() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


class _TornFile:
    def __init__(self, f, marker, die):
        self._f, self._marker, self._die = f, marker, die

    def write(self, data):
        needle = self._marker if isinstance(data, str) else self._marker.encode()
        if needle in data:
            self._f.write(data[: len(data) // 2])
            self._f.flush()
            os.fsync(self._f.fileno())
            self._die()
        return self._f.write(data)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()
        return False

    def __getattr__(self, name):
        return getattr(self._f, name)


def crash_on_write(marker: str, die: Callable[[], None], setattr=builtins.setattr) -> None:
    """Install the wrappers. In tests pass `monkeypatch.setattr` as `setattr` so they are undone."""
    real_open, real_save = io.open, torch.save

    def torn_open(file, mode="r", *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        return _TornFile(f, marker, die) if any(c in mode for c in "wax+") else f

    def torn_save(obj, f, *args, **kwargs):
        buf = io.BytesIO()
        real_save(obj, buf, *args, **kwargs)
        data = buf.getvalue()
        if marker.encode() not in data and not _contains_marker(obj, marker):
            return real_save(obj, f, *args, **kwargs)
        if isinstance(f, (str, os.PathLike)):
            with real_open(f, "wb") as out:
                out.write(data[: len(data) // 2])
                out.flush()
                os.fsync(out.fileno())
        else:
            f.write(data[: len(data) // 2])
        die()

    setattr(builtins, "open", torn_open)
    setattr(io, "open", torn_open)
    setattr(torch, "save", torn_save)


def _contains_marker(obj, marker: str) -> bool:
    """torch.save stores strings inside a zip: look for the marker in the object itself."""
    if isinstance(obj, str):
        return marker in obj
    if isinstance(obj, dict):
        return any(_contains_marker(k, marker) or _contains_marker(v, marker) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return any(_contains_marker(v, marker) for v in obj)
    return False
