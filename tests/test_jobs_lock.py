import json
import os
import socket
import threading

import pytest

from cluster_agent.errors import ConfigError
from cluster_agent.jobs_lock import LOCK_FILE, claim


def test_a_second_claim_is_refused_naming_the_holder(tmp_path):
    first = claim(tmp_path, 0)
    with pytest.raises(ConfigError) as caught:
        claim(tmp_path, 0)
    message = str(caught.value)
    assert str(tmp_path) in message and f"pid {os.getpid()}" in message and socket.gethostname() in message
    assert "\n" not in message
    first.release()
    claim(tmp_path, 0).release()


def test_a_stale_lock_file_never_blocks(tmp_path):
    (tmp_path / LOCK_FILE).write_text(json.dumps({"pid": 999999, "host": "gone", "since": 0}))
    lock = claim(tmp_path, 0)  # nobody holds the flock: the file's note is only a note
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    lock.release()


def test_waits_for_a_holder_that_lets_go(tmp_path, caplog):
    caplog.set_level("INFO")
    first = claim(tmp_path, 0)
    threading.Timer(0.5, first.release).start()
    second = claim(tmp_path, 10)
    assert "waiting up to 10 s" in caplog.text and "taking it over" in caplog.text
    second.release()


def test_gives_up_after_the_wait(tmp_path):
    first = claim(tmp_path, 0)
    now = [0.0]
    with pytest.raises(ConfigError) as caught:
        claim(tmp_path, 3, clock=lambda: now[0], sleep=lambda s: now.__setitem__(0, now[0] + s))
    assert "waited 3 s" in str(caught.value)
    first.release()


def test_a_link_in_place_of_the_lock_file_is_refused(tmp_path):
    os.symlink(tmp_path / "elsewhere", tmp_path / LOCK_FILE)
    with pytest.raises(ConfigError):
        claim(tmp_path, 0)
    assert not (tmp_path / "elsewhere").exists()


def test_a_lock_file_removed_or_replaced_is_locked_again_or_given_up(tmp_path):
    from cluster_agent.jobs_lock import _lock_now

    lock = claim(tmp_path, 0)
    assert lock.still_held()
    os.unlink(tmp_path / LOCK_FILE)  # a /tmp cleaner, or a hand
    assert lock.still_held()  # locked again at once
    with pytest.raises(ConfigError):
        claim(tmp_path, 0)  # so a second agent is still refused
    os.unlink(tmp_path / LOCK_FILE)
    other = _lock_now(tmp_path / LOCK_FILE)  # another agent was quicker
    assert not lock.still_held()
    os.close(other)
    lock.release()
