"""Removing a hostile program's tree (weak isolation's working directory): deeper than the
recursion, descriptor and path-length limits, unreadable, with links pointing out."""

import os
import resource
import stat

from wmtp_fn.sandbox.cleanup import remove_tree


def deep_chain(top: str, depth: int, name: str = "ab") -> None:
    """``top/ab/ab/.../ab`` (``depth`` levels), a file at every level; built through
    descriptors, as the path soon exceeds PATH_MAX."""
    fd = os.open(top, os.O_RDONLY)
    for i in range(depth):
        os.close(os.open(f"f{i % 3}", os.O_WRONLY | os.O_CREAT, dir_fd=fd))
        os.mkdir(name, dir_fd=fd)
        fd, parent = os.open(name, os.O_RDONLY, dir_fd=fd), fd
        os.close(parent)
    os.close(fd)


def test_a_chain_deeper_than_every_limit_is_removed(tmp_path):
    top = str(tmp_path / "work")
    os.mkdir(top)
    deep_chain(top, 1500)  # 4,500 characters of path (> PATH_MAX), 1,500 levels
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # a descriptor per level would run out; the remover holds two
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(int(fd) for fd in os.listdir("/proc/self/fd")) + 8, hard))
    try:
        assert remove_tree(top) is True
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert not os.path.exists(top)


def test_unreadable_entries_links_and_collisions(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("mine")
    top = tmp_path / "work"
    (top / "a" / "b").mkdir(parents=True)
    (top / "a" / "b" / "file").write_text("x")
    (top / ".wmtp_rm_0").mkdir()  # a name the remover itself would pick
    (top / ".wmtp_rm_0" / "c").mkdir()
    os.symlink(outside, top / "a" / "out_dir")
    os.symlink(outside / "keep.txt", top / "out_file")
    os.mkfifo(top / "fifo")
    os.chmod(top / "a" / "b", 0)
    os.chmod(top / "a", 0)
    os.chmod(top, stat.S_IWUSR)  # not even listable
    assert remove_tree(str(top)) is True
    assert not top.exists()
    assert (outside / "keep.txt").read_text() == "mine"  # links were removed, not followed


def test_missing_and_not_a_directory(tmp_path):
    assert remove_tree(str(tmp_path / "never")) is True
    (tmp_path / "file").write_text("x")
    assert remove_tree(str(tmp_path / "file")) is False  # never raises
    assert (tmp_path / "file").exists()
