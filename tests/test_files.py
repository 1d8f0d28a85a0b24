import os
import stat

import pytest

from cluster_agent.files import read_json, write_atomic, write_private


def test_write_atomic_sets_the_mode_whatever_the_umask(tmp_path):
    old = os.umask(0o077)
    try:
        write_atomic(tmp_path / "f", b"x", mode=0o644)
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "f").stat().st_mode) == 0o644
    assert not list(tmp_path.glob(".*.tmp"))


def test_write_private_is_0600_and_never_writes_through_a_link(tmp_path):
    write_private(tmp_path / "secret", b"pw")
    assert stat.S_IMODE((tmp_path / "secret").stat().st_mode) == 0o600
    (tmp_path / "target").write_text("keep")
    os.symlink(tmp_path / "target", tmp_path / "link")
    with pytest.raises(FileExistsError):
        write_private(tmp_path / "link", b"pw")
    assert (tmp_path / "target").read_text() == "keep"


def test_read_json_tolerates_torn_and_missing_files(tmp_path):
    (tmp_path / "torn").write_text('{"a": ')
    assert read_json(tmp_path / "torn") is None and read_json(tmp_path / "missing") is None
