import threading
import time

from cluster_agent.heartbeat import Heartbeat
from cluster_agent.models import Capabilities


class FakeClient:
    def __init__(self):
        self.sent = []
        self.lock = threading.Lock()

    def heartbeat(self, status, capabilities, *, cancel, attempts):
        with self.lock:
            self.sent.append(status)


def _capabilities():
    return Capabilities(cpu_count=1, memory_gb=1.0, gpu_count=0)


def test_heartbeats_go_on_as_draining_until_stopped():
    client = FakeClient()
    heartbeat = Heartbeat(client, _capabilities, interval=0.05)
    heartbeat.start()
    time.sleep(0.2)
    heartbeat.drain()
    time.sleep(0.3)
    heartbeat.stop()
    stopped = len(client.sent)
    time.sleep(0.15)
    assert len(client.sent) == stopped  # nothing after stop
    assert "active" in client.sent
    first_draining = client.sent.index("draining")
    assert all(status == "draining" for status in client.sent[first_draining:])
    assert len(client.sent) - first_draining >= 3


def test_drain_without_a_running_thread_sends_one_at_once():
    client = FakeClient()
    Heartbeat(client, _capabilities, interval=60).drain()
    assert client.sent == ["draining"]
