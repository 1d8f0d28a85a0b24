"""The engine's die events: a job's exit known at once; never an answer that is wrong, only one that is early."""

import queue
import threading
import time

from cluster_agent.clock import SYSTEM_CLOCK
from cluster_agent.executors.docker.exits import ExitEvents


class FakeStream:
    def __init__(self):
        self.items: queue.Queue = queue.Queue()

    def __iter__(self):
        while True:
            item = self.items.get()
            if item is StopIteration:
                return
            if isinstance(item, Exception):
                raise item
            yield item

    def close(self):
        self.items.put(StopIteration)


class FakeApi:
    def __init__(self):
        self.streams: list[FakeStream] = []
        self.calls: list[dict] = []
        self.connected = threading.Event()

    def events(self, since, filters, decode):
        self.calls.append({"since": since, "filters": filters})
        stream = FakeStream()
        self.streams.append(stream)
        self.connected.set()
        return stream


def die(container_id, code, at=1_000_000.0):
    return {"status": "die", "id": container_id, "timeNano": int(at * 1e9),
            "Actor": {"ID": container_id, "Attributes": {"exitCode": str(code), "radix.job_id": "j"}}}


def _started():
    api = FakeApi()
    events = ExitEvents(api, clock=SYSTEM_CLOCK)
    events.start()
    assert api.connected.wait(5)
    deadline = time.monotonic() + 5
    while not events.connected and time.monotonic() < deadline:
        time.sleep(0.01)
    return api, events


def test_an_exit_is_known_from_its_die_event_with_its_code_and_time():
    api, events = _started()
    assert api.calls[0]["filters"] == {"type": "container", "event": ["die", "oom"], "label": ["radix.job_id"]}
    waiter = []
    thread = threading.Thread(target=lambda: waiter.append(events.wait("c1", 10)))
    thread.start()
    api.streams[0].items.put(die("c1", 3, at=1234.5))
    thread.join(5)
    assert waiter[0].exit_code == 3 and waiter[0].at == 1234.5 and waiter[0].plain
    assert events.take("c1").exit_code == 3 and events.take("c1") is None  # judged once
    events.close()


def test_a_signal_death_is_announced_but_not_plain():
    # 137 may be an OOM kill whose oom event comes after die: the executor asks the engine for those.
    api, events = _started()
    api.streams[0].items.put(die("c1", 137))
    assert events.wait("c1", 5).plain is False
    events.close()


def test_while_the_stream_is_down_waiters_fall_back_at_once_and_it_reconnects_with_a_replay():
    api, events = _started()
    last = time.time() + 100
    api.streams[0].items.put(die("c0", 0, at=last))
    assert events.wait("c0", 5) is not None
    api.streams[0].items.put(ConnectionError("engine went away"))
    deadline = time.monotonic() + 5
    while events.connected and time.monotonic() < deadline:
        time.sleep(0.01)
    started = time.monotonic()
    assert events.wait("c1", 30) is None  # the caller asks the engine itself
    assert time.monotonic() - started < 5
    deadline = time.monotonic() + 5
    while len(api.calls) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    # Reconnected from just before the last event it saw: what the engine announced meanwhile is replayed.
    assert len(api.calls) == 2 and last - 10 <= api.calls[1]["since"] < last
    events.close()


def test_odd_events_are_ignored_and_memory_stays_bounded():
    from cluster_agent.executors.docker import exits

    api, events = _started()
    for odd in ({"status": "die"}, {"status": "start", "id": "c1"}, "text", die("c1", "x"), {**die("c1", 0), "id": 5}):
        api.streams[0].items.put(odd)
    for i in range(exits.MAX_REMEMBERED + 10):
        api.streams[0].items.put(die(f"k{i}", 0))
    assert events.wait(f"k{exits.MAX_REMEMBERED + 9}", 10) is not None
    assert events.take("c1") is None and events.take("k0") is None  # the oldest went first
    events.close()


def test_an_oom_event_before_the_exit_marks_it_not_plain():
    # A child killed for memory while its parent exits 0: the container's code says nothing of it.
    api, events = _started()
    api.streams[0].items.put({"status": "oom", "id": "c1", "Actor": {"Attributes": {}}})
    api.streams[0].items.put(die("c1", 0))
    announced = events.wait("c1", 5)
    assert announced.oom and not announced.plain
    events.close()


def test_on_podman_the_stream_asks_for_died_and_skips_containers_without_the_job_label():
    from cluster_agent.executors.docker.engine_kind import EngineKind

    api = FakeApi()
    events = ExitEvents(api, clock=SYSTEM_CLOCK, filters=EngineKind("Podman", "4.3.1").exit_event_filters())
    events.start()
    assert api.connected.wait(5)
    # Podman 4.3 matches its own event name (`died`) and ignores a label filter without a value.
    assert "died" in api.calls[0]["filters"]["event"] and "label" not in api.calls[0]["filters"]
    stranger = die("c2", 0)
    del stranger["Actor"]["Attributes"]["radix.job_id"]
    api.streams[0].items.put(stranger)
    api.streams[0].items.put(die("c1", 5))
    assert events.wait("c1", 5).exit_code == 5
    assert events.take("c2") is None  # another container's exit is not remembered
    events.close()
