"""recover_dir with two old copies left aside (surviving mutants of atomic): the newest by
modification time is put back, whatever the random names sort to, and the other is removed."""

import os

from wmtp_fn.atomic import recover_dir


def test_the_newest_old_copy_is_restored_and_the_rest_removed(tmp_path):
    final = tmp_path / "ck"
    newer, older = tmp_path / ".ck.old-00000000", tmp_path / ".ck.old-ffffffff"  # names sort the other way
    for d, text, t in ((newer, "new", 2_000_000_000), (older, "old", 1_000_000_000)):
        d.mkdir()
        (d / "meta.json").write_text(text)
        os.utime(d, ns=(t * 10**9, t * 10**9))
    recover_dir(final)
    assert (final / "meta.json").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]
