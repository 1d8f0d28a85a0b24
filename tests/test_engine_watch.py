import threading

from cluster_agent.engine_watch import BACKOFF_MAX_SECONDS, EngineWatch
from cluster_agent.errors import EngineUnavailable


class FlakyEngine:
    engine_name = "the fake engine"
    max_nodes = 1
    jobs_die_with_engine = True

    def __init__(self, answers):
        self.answers = list(answers)

    def ping(self):
        if not (self.answers.pop(0) if self.answers else True):
            raise EngineUnavailable("the fake engine does not answer")


def test_outage_and_return_are_logged_once_and_the_pause_doubles_to_a_cap(caplog):
    caplog.set_level("INFO")
    watch = EngineWatch(FlakyEngine([False, False, False, True]))
    assert not watch.up() and not watch.up() and watch.down
    pauses = [watch.next_pause() for _ in range(8)]
    assert pauses[:3] == [1.0, 2.0, 4.0] and max(pauses) == BACKOFF_MAX_SECONDS
    assert not watch.up() and watch.up() and not watch.down
    assert caplog.text.count("taking no jobs until it answers again") == 1
    assert caplog.text.count("answers again after") == 1
    assert watch.next_pause() == 1.0  # reset once it answered


def test_wait_until_up_is_nudged_and_departs_within_sees_an_engine_leaving():
    watch = EngineWatch(FlakyEngine([False, False, True]))
    nudge = threading.Event()
    nudge.set()  # every wait returns at once
    watch.wait_until_up(nudge)
    assert not watch.down
    assert EngineWatch(FlakyEngine([True, False])).took_its_jobs_along(5)
    assert not EngineWatch(FlakyEngine([])).took_its_jobs_along(0.3)
    survivor = FlakyEngine([False])
    survivor.jobs_die_with_engine = False
    assert not EngineWatch(survivor).took_its_jobs_along(5)
