import threading

from cluster_agent.errors import EngineUnavailable
from cluster_agent.executors.docker.reaper import ContainerReaper


def test_a_removal_the_engine_cannot_take_now_is_retried_until_it_can():
    attempts = []
    engine_back = threading.Event()

    def remove(container_id):
        attempts.append(container_id)
        if len(attempts) < 4:
            raise EngineUnavailable("Docker engine did not answer")

    reaper = ContainerReaper(remove, wait=lambda seconds: engine_back.wait(0.01))
    reaper.remove("abc")
    assert reaper.pending() == ["abc"]
    for _ in range(500):
        if not reaper.pending():
            break
        threading.Event().wait(0.01)
    assert reaper.pending() == [] and attempts == ["abc"] * 4


def test_a_removal_that_works_at_once_leaves_nothing_pending():
    removed = []
    reaper = ContainerReaper(removed.append)
    reaper.remove("abc")
    assert removed == ["abc"] and reaper.pending() == []
