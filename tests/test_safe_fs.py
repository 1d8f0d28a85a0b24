import os
import stat

import pytest

from cluster_agent import safe_fs
from cluster_agent.safe_fs import read_file_nofollow, remove_tree, write_new_file


def _deep_chain(top, depth):
    """A chain `depth` directories deep, built with short paths (deeper than PATH_MAX can name)."""
    here = os.getcwd()
    os.chdir(top)
    try:
        for _ in range(depth):
            os.mkdir("d")
            os.chdir("d")
        with open("leaf", "w") as handle:
            handle.write("x")
    finally:
        os.chdir(here)


def test_removes_a_tree_deeper_than_python_can_recurse(tmp_path):
    top = tmp_path / "job"
    top.mkdir()
    _deep_chain(top, 3000)
    assert remove_tree(top) is None
    assert not top.exists()


def test_never_follows_links_and_removes_them_as_links(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_text("keep")
    top = tmp_path / "job"
    (top / "sub").mkdir(parents=True)
    os.symlink(outside, top / "dirlink")
    os.symlink(outside / "keep", top / "sub" / "filelink")
    os.symlink("/nonexistent", top / "dangling")
    assert remove_tree(top) is None
    assert (outside / "keep").read_text() == "keep"


def test_the_path_itself_may_be_a_link_and_only_the_link_goes(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_text("keep")
    os.symlink(outside, tmp_path / "workspace")
    assert remove_tree(tmp_path / "workspace") is None
    assert (outside / "keep").exists() and not os.path.lexists(tmp_path / "workspace")


def test_fifos_unreadable_directories_and_odd_names(tmp_path):
    top = tmp_path / "job"
    top.mkdir()
    os.mkfifo(top / "fifo")
    (top / "new\nline").write_text("x")
    with open(os.fsencode(top) + b"/bad\xffname", "w") as handle:
        handle.write("x")
    locked = top / "locked"
    locked.mkdir()
    (locked / "f").write_text("x")
    locked.chmod(0)
    assert remove_tree(top) is None
    assert not top.exists()


def test_many_files(tmp_path):
    top = tmp_path / "job"
    top.mkdir()
    for i in range(5000):
        (top / str(i)).touch()
    assert remove_tree(top) is None


def test_what_cannot_be_removed_is_reported_once_and_the_rest_goes(tmp_path, monkeypatch):
    top = tmp_path / "job"
    (top / "a").mkdir(parents=True)
    (top / "a" / "stuck").write_text("x")
    (top / "b").mkdir()
    (top / "b" / "gone").write_text("x")
    real_unlink = os.unlink

    def unlink(path, *, dir_fd=None):
        if path == "stuck":
            raise PermissionError(1, "Operation not permitted")
        return real_unlink(path, dir_fd=dir_fd)

    monkeypatch.setattr(safe_fs.os, "unlink", unlink)
    problem = remove_tree(top)
    assert problem is not None and "stuck" in problem and "Operation not permitted" in problem
    assert not (top / "b").exists() and (top / "a" / "stuck").exists()


def test_removal_of_a_missing_path_is_not_an_error(tmp_path):
    assert remove_tree(tmp_path / "missing") is None
    assert remove_tree(tmp_path / "missing-parent" / "x") is None


def test_the_descriptor_limit_is_never_reached(tmp_path):
    top = tmp_path / "job"
    top.mkdir()
    _deep_chain(top, safe_fs.MAX_OPEN_DEPTH * 5 + 3)
    before = len(os.listdir("/proc/self/fd"))
    assert remove_tree(top) is None
    assert len(os.listdir("/proc/self/fd")) == before


def test_read_refuses_links_fifos_and_oversized_files(tmp_path):
    (tmp_path / "real").write_bytes(b"abc")
    os.symlink(tmp_path / "real", tmp_path / "link")
    os.mkfifo(tmp_path / "fifo")
    assert read_file_nofollow(tmp_path / "real", 10) == b"abc"
    assert read_file_nofollow(tmp_path / "link", 10) is None
    assert read_file_nofollow(tmp_path / "fifo", 10) is None  # never blocks
    assert read_file_nofollow(tmp_path / "real", 2) is None
    assert read_file_nofollow(tmp_path / "missing", 2) is None


def test_write_new_file_never_writes_through_what_is_there(tmp_path):
    target = tmp_path / "host-file"
    target.write_text("host")
    os.symlink(target, tmp_path / "input.json")
    with pytest.raises(FileExistsError):
        write_new_file(tmp_path / "input.json", b"{}")
    assert target.read_text() == "host"
    write_new_file(tmp_path / "fresh.json", b"{}", mode=0o644)
    assert stat.S_IMODE((tmp_path / "fresh.json").stat().st_mode) == 0o644


def test_each_directory_is_listed_once_however_wide(tmp_path, monkeypatch):
    """A workspace of many directories must not cost quadratic time (the slot waits for its removal)."""
    top = tmp_path / "job"
    top.mkdir()
    for i in range(500):
        (top / f"d{i}").mkdir()
        (top / f"d{i}" / "f").write_text("x")
    calls = []
    real_listdir = os.listdir

    def listdir(fd):
        calls.append(fd)
        return real_listdir(fd)

    monkeypatch.setattr(safe_fs.os, "listdir", listdir)
    assert remove_tree(top) is None
    assert len(calls) <= 501
