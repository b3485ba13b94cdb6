"""Removing a run's working directory on the host (weak isolation only: an isolated run's files
live in its own tmpfs, which the kernel frees with the namespace).

The program decides what the tree looks like, so removal must hold up whatever it is: deeper
than any recursion or file-descriptor limit, paths longer than PATH_MAX, directories it made
unreadable (mode 000), symlinks that point out (never followed: removed, not resolved).
"""

from __future__ import annotations

import os
import stat

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW


def _free_name(root_fd: int, counter: int) -> tuple[str, int]:
    while True:
        name = f".wmtp_rm_{counter}"
        try:
            os.stat(name, dir_fd=root_fd, follow_symlinks=False)
        except FileNotFoundError:
            return name, counter + 1
        counter += 1


def _empty_one_level(root_fd: int, name: str, counter: int) -> int:
    """Delete the files of directory ``name`` (in root), move its subdirectories up into root
    under fresh names, remove it; returns the advanced name counter."""
    os.chmod(name, 0o700, dir_fd=root_fd)  # it was checked to be a directory, not a link
    fd = os.open(name, _DIR_FLAGS, dir_fd=root_fd)
    try:
        for child in os.listdir(fd):
            if stat.S_ISDIR(os.stat(child, dir_fd=fd, follow_symlinks=False).st_mode):
                new, counter = _free_name(root_fd, counter)
                os.rename(child, new, src_dir_fd=fd, dst_dir_fd=root_fd)
            else:
                os.unlink(child, dir_fd=fd)
    finally:
        os.close(fd)
    os.rmdir(name, dir_fd=root_fd)
    return counter


def remove_tree(path: str) -> bool:
    """Remove directory ``path`` and everything below it; True when it is gone.

    Never raises and never recurses: the tree is flattened one level at a time into ``path``
    (a subdirectory's own subdirectories are renamed up, its files deleted), holding at most
    two descriptors. Gives up (False) only when a pass over ``path`` removes nothing.
    """
    try:
        os.chmod(path, 0o700)
        root_fd = os.open(path, _DIR_FLAGS)
    except FileNotFoundError:
        return True
    except OSError:
        return False
    counter = 0
    try:
        while True:
            entries = os.listdir(root_fd)
            if not entries:
                break
            progress = False
            for name in entries:
                try:
                    mode = os.stat(name, dir_fd=root_fd, follow_symlinks=False).st_mode
                    if stat.S_ISDIR(mode):
                        counter = _empty_one_level(root_fd, name, counter)
                    else:
                        os.unlink(name, dir_fd=root_fd)
                    progress = True
                except OSError:
                    continue
            if not progress:
                return False
    except Exception:  # noqa: BLE001 - cleanup must not take a batch down with it
        return False
    finally:
        os.close(root_fd)
    try:
        os.rmdir(path)
        return True
    except OSError:
        return False
