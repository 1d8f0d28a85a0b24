"""The poller never misses a freed slot: a slot that frees while the capacity is being counted breaks off the
capacity-0 poll (or keeps it from going out), so a waiting job is asked for at once, not after a long poll."""

import threading

from cluster_agent.errors import PollInterrupted
from cluster_agent.models import PollResult
from cluster_agent.poller import Poller
from cluster_agent.settings import Settings


class FakeClient:
    def __init__(self, stopping):
        self.polls = []
        self.held_a_zero_poll = False
        self._stopping = stopping

    def poll(self, capacity, *, wait_seconds, running_job_ids, free_gpus, cancel, interrupt):
        self.polls.append(capacity)
        if interrupt is not None and interrupt.is_set():
            raise PollInterrupted()
        if capacity == 0:
            self.held_a_zero_poll = True  # a long poll that carries nothing: the freed slot was missed
            if interrupt is not None and interrupt.wait(5):
                raise PollInterrupted()
            return PollResult(jobs=[], cancel_job_ids=[], long_poll=True)
        self._stopping.set()
        return PollResult(jobs=[{"job_id": "waiting"}], cancel_job_ids=[], long_poll=True)

    def interrupt_poll(self):
        pass


class UpEngine:
    down = False

    def up(self):
        return True


class NoGpus:
    def free_count(self):
        return 0


def test_a_slot_freed_while_the_capacity_is_counted_is_not_missed():
    stopping = threading.Event()
    client = FakeClient(stopping)
    accepted = []
    counts = iter([0, 1])
    poller = None

    def capacity():
        free = next(counts)
        if free == 0:
            poller.wake()  # the slot frees right after it was counted busy
        return free

    poller = Poller(Settings(), client, engine=UpEngine(), gpus=NoGpus(), stopping=stopping, capacity=capacity,
                    running_job_ids=lambda: [], accept=accepted.append, cancel=lambda job_id: None,
                    clock=lambda: 0.0)
    poller.start()
    poller.join(10)
    assert accepted == [{"job_id": "waiting"}]
    assert not client.held_a_zero_poll
