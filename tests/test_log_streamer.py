import json
import threading

import httpx
import respx

from cluster_agent.control_plane import ControlPlaneClient, RetryPolicy
from cluster_agent.log_streamer import LogBuffer, LogStreamer

BASE = "https://cp.example.com"
LOGS = f"{BASE}/v1/clusters/c1/jobs/j1/logs"
FAST = RetryPolicy(initial=0.001, maximum=0.005, jitter=0.001)


def test_buffer_keeps_order_while_it_fits():
    buf = LogBuffer(capacity=100)
    for piece in (b"ab", b"cd", b"ef"):
        buf.append(piece)
    assert buf.take(4) == (b"abcd", 0)
    assert buf.take(100) == (b"ef", 0)
    assert buf.take(100) == (b"", 0)


def test_buffer_queues_overflow_in_order_without_dropping():
    buf = LogBuffer(capacity=4)
    buf.append(b"1234")
    buf.append(b"56")  # head full: queued behind it
    buf.append(b"7")
    assert buf.take(10) == (b"1234", 0)
    assert buf.take(10) == (b"567", 0)


def test_buffer_drops_the_middle_and_keeps_first_and_latest():
    buf = LogBuffer(capacity=10)
    buf.append(b"FIRST-PART")  # fills the head
    for i in range(1000):
        buf.append(b"middle%04d" % i)
    buf.append(b"THE-LATEST")
    assert buf.pending() <= 20  # memory stays bounded
    first, dropped = buf.take(100)
    assert (first, dropped) == (b"FIRST-PART", 0)
    latest, dropped = buf.take(100)
    assert latest == b"THE-LATEST"
    assert dropped == 10 * 1000  # every middle byte is accounted for
    assert buf.total_bytes == 20 + 10 * 1000


def _streamer(client, **kwargs):
    cancels = []
    streamer = LogStreamer(client, "j1", on_cancel=lambda: cancels.append(1), flush_seconds=0.05, **kwargs)
    return streamer, cancels


def _bodies(route):
    return [json.loads(call.request.content) for call in route.calls]


@respx.mock
def test_stream_is_contiguous_utf8_chunks_of_at_most_the_limit():
    route = respx.post(LOGS).respond(200, json={})
    client = ControlPlaneClient(BASE, "c1", "t", token="tok", retry=FAST)
    streamer, _ = _streamer(client, max_chunk=1000)
    text = "".join(f"line {i} ünïcødé ✓\n" for i in range(500))
    streamer.start()
    data = text.encode()
    for start in range(0, len(data), 777):  # pieces that split multi-byte characters
        streamer.buffer.append(data[start:start + 777])
    assert streamer.finish(10)
    bodies = _bodies(route)
    offset = 0
    for body in bodies:
        assert body["offset"] == offset
        size = len(body["data"].encode())
        assert size <= 1000
        offset += size
    assert "".join(b["data"] for b in bodies) == text
    assert len(bodies) >= len(data) // 1000


@respx.mock
def test_failed_chunks_are_retried_with_the_same_offset():
    route = respx.post(LOGS).mock(
        side_effect=[httpx.Response(503), httpx.ConnectError("x"), httpx.Response(200, json={})] + [httpx.Response(200, json={})] * 10
    )
    client = ControlPlaneClient(BASE, "c1", "t", token="tok", retry=FAST)
    streamer, _ = _streamer(client)
    streamer.start()
    streamer.buffer.append(b"hello\n")
    assert streamer.finish(10)
    bodies = _bodies(route)
    assert [b["offset"] for b in bodies] == [0, 0, 0]
    assert {b["data"] for b in bodies} == {"hello\n"}


@respx.mock
def test_cancel_answer_is_passed_on():
    respx.post(LOGS).respond(200, json={"cancel": True})
    client = ControlPlaneClient(BASE, "c1", "t", token="tok", retry=FAST)
    streamer, cancels = _streamer(client)
    streamer.start()
    streamer.buffer.append(b"x")
    streamer.finish(10)
    assert cancels == [1]


@respx.mock
def test_404_turns_logs_off_for_the_server(caplog):
    route = respx.post(LOGS).respond(404)
    client = ControlPlaneClient(BASE, "c1", "t", token="tok", retry=FAST)
    streamer, _ = _streamer(client)
    streamer.start()
    streamer.buffer.append(b"x" * 100)
    assert streamer.finish(10)
    assert route.call_count == 1
    assert not client.supports("logs")
    assert sum("no logs endpoint" in r.message for r in caplog.records) == 1


@respx.mock
def test_dropped_output_is_announced_in_the_stream():
    route = respx.post(LOGS).respond(200, json={})
    client = ControlPlaneClient(BASE, "c1", "t", token="tok", retry=FAST)
    streamer, _ = _streamer(client, buffer=LogBuffer(capacity=8))
    streamer.buffer.append(b"BEGIN---")
    for _ in range(100):
        streamer.buffer.append(b"0123456789")
    streamer.buffer.append(b"--END---")
    streamer.start()
    assert streamer.finish(10)
    log = "".join(b["data"] for b in _bodies(route))
    assert log.startswith("BEGIN---")
    assert "bytes of output dropped" in log
    assert log.endswith("--END---")


@respx.mock
def test_output_is_flushed_while_the_job_still_runs():
    route = respx.post(LOGS).respond(200, json={})
    client = ControlPlaneClient(BASE, "c1", "t", token="tok", retry=FAST)
    streamer, _ = _streamer(client)
    streamer.start()
    streamer.buffer.append(b"early\n")
    sent = threading.Event()
    for _ in range(100):
        if route.called:
            sent.set()
            break
        threading.Event().wait(0.05)
    assert sent.is_set(), "nothing was sent within 5 s while the buffer stayed open"
    streamer.finish(5)


@respx.mock
def test_a_resumed_stream_skips_what_the_server_has_and_continues_its_offsets():
    route = respx.post(LOGS).respond(200, json={})
    client = ControlPlaneClient(BASE, "c1", "t", token="tok", retry=FAST)
    acknowledged = []
    text = "first part ✓\nsecond part\n"
    already = len("first part ✓\n".encode())
    streamer = LogStreamer(
        client, "j1", on_cancel=lambda: None, flush_seconds=0.05, resume_offset=already,
        on_acknowledged=acknowledged.append,
    )
    streamer.start()
    streamer.buffer.append(text.encode())  # replayed from the start after a restart
    assert streamer.finish(10)
    bodies = _bodies(route)
    assert bodies == [{"offset": already, "data": "second part\n"}]
    assert acknowledged[-1] == len(text.encode())


def test_a_batching_pause_ends_when_the_job_ends_or_a_chunk_fills():
    """The last chunk (and so the result) must not wait out a batching pause: close() and a full chunk end it."""
    for finish in (lambda buf: buf.close(), lambda buf: buf.append(b"x" * 10)):
        buf = LogBuffer()
        buf.append(b"{\"n\": 1}\n")
        waiter = threading.Thread(target=buf.wait_for_batch, args=(10, 30.0))
        waiter.start()
        finish(buf)
        waiter.join(5)
        assert not waiter.is_alive()
