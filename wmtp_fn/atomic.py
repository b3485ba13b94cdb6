"""Atomic files and directories: readers see the old version or the new one, never half of one.

A file is written under a temporary name in the same directory, fsync'ed, given the mode a plain
`open()` would have given it (0666 minus the umask; `mkstemp` makes it 0600), then renamed over
the target with `os.replace`. A directory is built under a temporary name and renamed into place;
replacing an existing one takes two renames, and `recover_dir` repairs a crash between them.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def fsync_path(path: Path) -> None:
    """Flush a file's or a directory's entry to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def default_file_mode() -> int:
    """The mode `open(path, "w")` gives a new file: 0666 minus the process umask."""
    mask = os.umask(0)  # the umask can only be read by setting it; put it back at once
    os.umask(mask)
    return 0o666 & ~mask


@contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """Yield a temporary path in `path`'s directory; if the block completes, the file written
    there gets the usual permissions, is fsync'ed and replaces `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.chmod(tmp, default_file_mode())
        fsync_path(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_path(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    """Replace `path` by `text` atomically."""
    with atomic_file(path) as tmp:
        tmp.write_text(text)


def recover_dir(final: Path) -> None:
    """Finish a replacement of `final` that crashed between its two renames (`atomic_dir`):
    the old, complete copy waits under `.{name}.old-*`; put it back. Leftover old copies of a
    finished replacement are removed."""
    final = Path(final)
    olds = sorted(final.parent.glob(f".{final.name}.old-*"), key=lambda p: p.stat().st_mtime_ns)
    if not final.exists() and olds:
        os.rename(olds.pop(), final)
        fsync_path(final.parent)
    for old in olds:
        shutil.rmtree(old, ignore_errors=True)


@contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temporary directory that becomes `final` only if the block completes.

    Replacing an existing `final` takes two renames (old aside, new in); a crash between them
    leaves the old copy aside, and `recover_dir` (called here and by every reader) restores it.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    recover_dir(final)
    tmp = final.parent / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()  # mode 0777 minus the umask, like any new directory
    try:
        yield tmp
        for f in tmp.iterdir():
            fsync_path(f)
        fsync_path(tmp)
        if final.exists():  # re-saving the same name: move the old one aside, then drop it
            trash = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(final, trash)
            os.rename(tmp, final)
            shutil.rmtree(trash)
        else:
            os.rename(tmp, final)
        fsync_path(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
