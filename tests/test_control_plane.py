import hashlib
import itertools
import json
import re
import shutil
import socket
import ssl
import subprocess
import threading
import time

import httpx
import pytest
import respx
from tenacity import RetryCallState

from cluster_agent.control_plane import (
    ANSWER_LIMIT,
    MAX_ITEM_FAULTS_LOGGED,
    POLL_ANSWER_LIMIT,
    ControlPlaneClient,
    Delivery,
    PollInterrupted,
    RequestNotSendable,
    RetryPolicy,
    idempotency_key,
)
from cluster_agent._transport import _BackoffWait
from cluster_agent.errors import ControlPlaneError, ControlPlaneUnavailable, MalformedResponse, TokenRejected
from cluster_agent.models import Capabilities, Completion, JobMetrics, JobStatus

BASE = "https://cp.example.com/api"
CLUSTER = f"{BASE}/v1/clusters/c1"
TOKEN = "s3cret-cluster-token"
FAST = RetryPolicy(initial=0.001, maximum=0.005, jitter=0.001, token_rejected=0.01)


@pytest.fixture
def client():
    c = ControlPlaneClient(BASE, "c1", "tenant-a", token=TOKEN, retry=FAST)
    yield c
    c.close()


def _poll(client, cancel=None, wait=25.0):
    return client.poll(1, wait_seconds=wait, running_job_ids=[], free_gpus=0, cancel=cancel or threading.Event())


def _completion():
    return Completion(
        tenant_id="tenant-a", status=JobStatus.SUCCEEDED, output_payload={"a": 1},
        metrics=JobMetrics(runtime_seconds=1.5, exit_code=0),
    )


@respx.mock
def test_requests_carry_the_contract_headers_and_no_token_in_the_url(client):
    route = respx.post(f"{CLUSTER}/jobs/poll").respond(200, json={"jobs": []})
    _poll(client)
    request = route.calls.last.request
    assert request.headers["X-Radix-Cluster-Token"] == TOKEN
    assert request.headers["X-Radix-Tenant-Id"] == "tenant-a"
    assert request.headers["Content-Type"] == "application/json"
    assert request.headers["User-Agent"].startswith("radix-cluster-agent/")
    assert TOKEN not in str(request.url)
    body = json.loads(request.content)
    assert body == {"max_jobs": 1, "wait_seconds": 25.0, "running_job_ids": [], "free_gpus": 0}


@respx.mock
def test_read_timeout_outlasts_the_long_poll_hold(client):
    route = respx.post(f"{CLUSTER}/jobs/poll").respond(200, json={"jobs": []})
    _poll(client, wait=25.0)
    timeout = route.calls.last.request.extensions["timeout"]
    assert timeout["read"] > 25.0


@respx.mock
def test_long_poll_marker_is_read(client):
    respx.post(f"{CLUSTER}/jobs/poll").mock(
        side_effect=[httpx.Response(200, json={"jobs": []}, headers={"X-Radix-Long-Poll": "1"}),
                     httpx.Response(200, json={"jobs": []})]
    )
    assert _poll(client).long_poll is True
    assert _poll(client).long_poll is False


@respx.mock
def test_jobs_and_cancellations_are_returned_raw(client):
    # Jobs are checked for shape only: the job runner turns a bad spec into an invalid_job result.
    jobs = [{"job_id": "a"}, {"job_id": "bad id", "image": 7}, {"no_id": True}]
    respx.post(f"{CLUSTER}/jobs/poll").respond(200, json={"jobs": jobs, "cancel_job_ids": ["b"]})
    result = _poll(client)
    assert result.jobs == jobs
    assert result.cancel_job_ids == ["b"]


@respx.mock
def test_network_errors_5xx_408_429_are_retried(client):
    route = respx.post(f"{CLUSTER}/jobs/poll").mock(
        side_effect=[
            httpx.ConnectError("refused"),
            httpx.Response(503),
            httpx.Response(408),
            httpx.Response(429, headers={"Retry-After": "0"}),
            httpx.ReadTimeout("slow"),
            httpx.Response(200, json={"jobs": [{"job_id": "x"}]}),
        ]
    )
    assert _poll(client).jobs == [{"job_id": "x"}]
    assert route.call_count == 6


@respx.mock
def test_a_dead_api_base_is_named_once_per_outage_with_the_setting_to_check(client, caplog):
    respx.post(f"{CLUSTER}/jobs/poll").mock(
        side_effect=[httpx.ConnectError("refused")] * 4 + [httpx.Response(200, json={"jobs": []})]
        + [httpx.ConnectError("refused")] * 2 + [httpx.Response(200, json={"jobs": []})]
    )
    with caplog.at_level("ERROR"):
        _poll(client)
        _poll(client)
    hints = [r.getMessage() for r in caplog.records if "nothing answers" in r.getMessage()]
    assert hints == [f"nothing answers at https://cp.example.com: check --api-base / RADIX_API_BASE (its host, port "
                     "and scheme) and that the control plane runs; the agent keeps retrying"] * 2  # one per outage
    assert TOKEN not in caplog.text


def _answer_until_cancelled(status, cancel, calls, after=3):
    """A side effect answering `status`, setting `cancel` on the `after`-th call."""

    def answer(request):
        calls.append(request)
        if len(calls) == after:
            cancel.set()
        return httpx.Response(status)

    return answer


@respx.mock
@pytest.mark.parametrize("status, error", [(502, ControlPlaneUnavailable), (403, TokenRejected)])
def test_poll_retries_until_cancelled(client, status, error):
    # 5xx with the exponential backoff; 401/403 with the slow token-rejected backoff: never given up by itself.
    cancel, calls = threading.Event(), []
    respx.post(f"{CLUSTER}/jobs/poll").mock(side_effect=_answer_until_cancelled(status, cancel, calls))
    with pytest.raises(error):
        _poll(client, cancel)
    assert len(calls) == 3


@respx.mock
def test_heartbeat_gives_up_after_its_attempts(client):
    route = respx.post(f"{CLUSTER}/heartbeat").respond(500)
    caps = Capabilities(cpu_count=2, memory_gb=4.0, gpu_count=0)
    with pytest.raises(ControlPlaneUnavailable):
        client.heartbeat("active", caps, cancel=threading.Event(), attempts=3)
    assert route.call_count == 3
    body = json.loads(route.calls.last.request.content)
    assert body["status"] == "active" and body["capabilities"]["cpu_count"] == 2 and "agent_version" in body


def _state_after(exc, attempt):
    state = RetryCallState(retry_object=None, fn=None, args=(), kwargs={})
    state.attempt_number = attempt
    state.set_exception((type(exc), exc, None))
    return state


def test_backoff_grows_and_is_capped():
    wait = _BackoffWait(RetryPolicy(initial=1, maximum=60, jitter=1))
    exc = ControlPlaneUnavailable("x")
    first, fifth, many = (wait(_state_after(exc, n)) for n in (1, 5, 30))
    assert 1 <= first <= 2
    assert 16 <= fifth <= 17
    assert many == 60


def test_backoff_honours_retry_after_up_to_the_cap():
    wait = _BackoffWait(RetryPolicy(initial=1, maximum=60, jitter=0))
    assert wait(_state_after(ControlPlaneUnavailable("x", status=429, retry_after=30), 1)) == 30
    assert wait(_state_after(ControlPlaneUnavailable("x", status=503, retry_after=600), 1)) == 60


def test_token_rejection_waits_the_slow_backoff():
    wait = _BackoffWait(RetryPolicy(initial=1, maximum=60, token_rejected=60))
    assert wait(_state_after(TokenRejected("no", status=401), 1)) == 60


@respx.mock
def test_401_is_a_clear_token_rejected_error_without_the_token(client):
    respx.post(f"{CLUSTER}/heartbeat").respond(401)
    with pytest.raises(TokenRejected) as caught:
        client.heartbeat("active", Capabilities(cpu_count=1, memory_gb=1, gpu_count=0), cancel=threading.Event())
    assert "token rejected" in str(caught.value)
    assert TOKEN not in str(caught.value)


@respx.mock
@pytest.mark.parametrize(
    "response",
    [
        httpx.Response(200, text="<html>gateway</html>"),
        httpx.Response(200, json=["not", "an", "object"]),
        httpx.Response(200, json="a string"),
        httpx.Response(200, json=None),
        httpx.Response(200, text="[" * 100_000),  # nested deeper than the JSON parser goes
    ],
)
def test_malformed_answers_raise_malformed_response(client, response):
    respx.post(f"{CLUSTER}/jobs/poll").mock(return_value=response)
    with pytest.raises(MalformedResponse):
        _poll(client)


@respx.mock
def test_complete_retries_with_the_same_idempotency_key(client):
    route = respx.post(f"{CLUSTER}/jobs/job-1/complete").mock(
        side_effect=[httpx.ConnectError("down"), httpx.Response(500), httpx.Response(200, json={})]
    )
    assert client.complete("job-1", _completion(), cancel=threading.Event()) is Delivery.DELIVERED
    assert route.call_count == 3
    assert {call.request.headers["Idempotency-Key"] for call in route.calls} == {"job-1"}
    body = json.loads(route.calls.last.request.content)
    assert body["status"] == "succeeded" and body["tenant_id"] == "tenant-a"
    assert body["metrics"] == {"runtime_seconds": 1.5, "exit_code": 0}
    assert body["failure_reason"] is None and body["error_message"] is None


@respx.mock
@pytest.mark.parametrize("status", [404, 409, 410])
def test_complete_stops_when_the_server_no_longer_wants_the_result(client, status):
    route = respx.post(f"{CLUSTER}/jobs/job-1/complete").respond(status)
    assert client.complete("job-1", _completion(), cancel=threading.Event()) is Delivery.NOT_WANTED
    assert route.call_count == 1


@respx.mock
def test_complete_does_not_drop_a_result_on_other_client_errors(client):
    route = respx.post(f"{CLUSTER}/jobs/job-1/complete").mock(
        side_effect=[httpx.Response(400), httpx.Response(401), httpx.Response(200, json={})]
    )
    assert client.complete("job-1", _completion(), cancel=threading.Event()) is Delivery.DELIVERED
    assert route.call_count == 3


@respx.mock
def test_complete_is_abandoned_when_cancelled(client):
    cancel = threading.Event()
    cancel.set()
    respx.post(f"{CLUSTER}/jobs/job-1/complete").respond(503)
    assert client.complete("job-1", _completion(), cancel=cancel) is Delivery.ABANDONED


@respx.mock
def test_job_ids_are_quoted_in_paths(client):
    route = respx.post(url__regex=r".*/jobs/bad%20id%2F..%2Fx/complete$").respond(200, json={})
    client.complete("bad id/../x", _completion(), cancel=threading.Event())
    assert route.called


@respx.mock
def test_exchange_returns_the_cluster_token_and_sends_the_one_time_token():
    client = ControlPlaneClient(BASE, "c1", "tenant-a", retry=FAST)
    route = respx.post(f"{CLUSTER}/auth/exchange").respond(200, json={"cluster_token": "new-token"})
    assert client.exchange_token("ott-1", cancel=threading.Event()) == "new-token"
    request = route.calls.last.request
    assert request.headers["X-Radix-One-Time-Token"] == "ott-1"
    assert "X-Radix-Cluster-Token" not in request.headers


@respx.mock
def test_exchange_rejection_is_not_retried():
    client = ControlPlaneClient(BASE, "c1", "tenant-a", retry=FAST)
    route = respx.post(f"{CLUSTER}/auth/exchange").respond(401)
    with pytest.raises(TokenRejected):
        client.exchange_token("used", cancel=threading.Event())
    assert route.call_count == 1


# --- one bad item never loses the good ones ------------------------------------------------------------------

GOOD_JOB = {"job_id": "good-1", "image": "busybox"}


@respx.mock
def test_a_bad_cancel_id_does_not_lose_the_job(client, caplog):
    respx.post(f"{CLUSTER}/jobs/poll").respond(200, json={"jobs": [GOOD_JOB], "cancel_job_ids": [42]})
    result = _poll(client)
    assert result.jobs == [GOOD_JOB]
    assert result.cancel_job_ids == []
    [line] = [r.getMessage() for r in caplog.records if "cancel_job_ids" in r.getMessage()]
    assert "cancel_job_ids[0] is 42 (int)" in line and "skipped" in line


@respx.mock
@pytest.mark.parametrize(
    "answer, jobs, cancels, complaint",
    [
        ({"jobs": "not-a-list", "cancel_job_ids": ["c1"]}, [], ["c1"], "jobs is 'not-a-list' (str), not a list"),
        ({"jobs": {"job_id": "x"}, "cancel_job_ids": ["c1"]}, [], ["c1"], "jobs is an object with 1 key(s), not a list"),
        ({"jobs": [GOOD_JOB], "cancel_job_ids": "c1"}, [GOOD_JOB], [], "cancel_job_ids is 'c1' (str), not a list"),
        ({"jobs": [GOOD_JOB], "cancel_job_ids": {"c1": 1}}, [GOOD_JOB], [], "cancel_job_ids is an object with 1 key(s)"),
        ({"jobs": ["junk", GOOD_JOB], "cancel_job_ids": ["c1"]}, [GOOD_JOB], ["c1"], "jobs[0] is 'junk' (str), not a job object"),
        ({"jobs": [GOOD_JOB, 7]}, [GOOD_JOB], [], "jobs[1] is 7 (int)"),
        ({"jobs": [None, GOOD_JOB]}, [GOOD_JOB], [], "jobs[0] is None (NoneType)"),
        ({"jobs": [[GOOD_JOB]]}, [], [], "jobs[0] is a list of 1 item(s)"),
        ({"jobs": [GOOD_JOB], "cancel_job_ids": ["", "c1"]}, [GOOD_JOB], ["c1"], "cancel_job_ids[0] is '' (str)"),
        ({"jobs": [GOOD_JOB], "cancel_job_ids": [None, "c1"]}, [GOOD_JOB], ["c1"], "cancel_job_ids[0] is None"),
        ({"jobs": [GOOD_JOB], "cancel_job_ids": ["c1", {"id": 1}]}, [GOOD_JOB], ["c1"], "cancel_job_ids[1] is an object with 1 key(s)"),
        ({"jobs": [GOOD_JOB], "cancel_job_ids": ["c1", True]}, [GOOD_JOB], ["c1"], "cancel_job_ids[1] is True (bool)"),
        # An id no job here can have (it would fail as invalid_job): nothing to cancel, and kept out of log lines raw.
        ({"jobs": [GOOD_JOB], "cancel_job_ids": ["x\nforged"]}, [GOOD_JOB], [], r"cancel_job_ids[0] is 'x\nforged' (str)"),
    ],
)
def test_each_bad_item_is_skipped_with_one_line_and_the_rest_is_kept(client, caplog, answer, jobs, cancels, complaint):
    respx.post(f"{CLUSTER}/jobs/poll").respond(200, json=answer)
    result = _poll(client)
    assert result.jobs == jobs
    assert result.cancel_job_ids == cancels
    lines = [r.getMessage() for r in caplog.records if r.name == "cluster_agent.control_plane"]
    assert len(lines) == 1, lines
    assert complaint in lines[0] and "skipped" in lines[0]
    assert "\n" not in lines[0]


@respx.mock
@pytest.mark.parametrize("answer", [{}, {"jobs": None, "cancel_job_ids": None}, {"jobs": [], "extra": {"x": 1}}])
def test_absent_or_null_lists_are_empty_without_complaint(client, caplog, answer):
    respx.post(f"{CLUSTER}/jobs/poll").respond(200, json=answer)
    result = _poll(client)
    assert result.jobs == [] and result.cancel_job_ids == []
    assert not [r for r in caplog.records if r.name == "cluster_agent.control_plane"]


@respx.mock
def test_many_bad_items_are_counted_not_each_logged(client, caplog):
    respx.post(f"{CLUSTER}/jobs/poll").respond(200, json={"jobs": [GOOD_JOB], "cancel_job_ids": list(range(10_000))})
    result = _poll(client)
    assert result.jobs == [GOOD_JOB]
    lines = [r.getMessage() for r in caplog.records if r.name == "cluster_agent.control_plane"]
    assert len(lines) == MAX_ITEM_FAULTS_LOGGED + 1
    assert f"{10_000 - MAX_ITEM_FAULTS_LOGGED} more malformed items skipped" in lines[-1]


# --- ids that break the contract still travel --------------------------------------------------------------

@pytest.mark.parametrize("job_id", ["a", "job-1", "A.b_c-9", "x" * 128])
def test_idempotency_key_of_a_contract_id_is_the_id(job_id):
    assert idempotency_key(job_id) == job_id


@pytest.mark.parametrize(
    "job_id, key",
    [
        ("bad\nid", "bad%0Aid"),
        ("bad id/../x", "bad%20id%2F..%2Fx"),
        ("-starts-with-dash", "-starts-with-dash"),  # breaks the pattern, but every character is header-safe
        ("é", "%C3%A9"),
        ("\ud800", "%ED%A0%80"),  # a lone surrogate, which JSON can carry and UTF-8 cannot
        ("x" * 129, "x" * 129),
        ("x" * 200, "x" * 200),
    ],
)
def test_idempotency_key_of_any_other_id_is_percent_encoded(job_id, key):
    assert idempotency_key(job_id) == key


@pytest.mark.parametrize("job_id", ["x" * 201, "\n" * 67, "é" * 5000])
def test_idempotency_key_of_a_long_id_is_its_sha256(job_id):
    key = idempotency_key(job_id)
    assert key == "sha256:" + hashlib.sha256(job_id.encode("utf-8")).hexdigest()
    assert idempotency_key(job_id) == key  # the same on every attempt


@respx.mock
@pytest.mark.parametrize(
    "job_id, encoded",
    [
        ("bad\n2026-01-01 INFO cluster_agent: forged", "bad%0A2026-01-01%20INFO%20cluster_agent%3A%20forged"),
        ("tab\there", "tab%09here"),
        ("üñí", "%C3%BC%C3%B1%C3%AD"),
        ("\ud800", "%ED%A0%80"),
        ("cr\r\nx", "cr%0D%0Ax"),
    ],
)
def test_a_result_for_an_id_that_breaks_the_contract_is_delivered_once(client, job_id, encoded):
    route = respx.post(url__regex=rf".*/jobs/{re.escape(encoded)}/complete$").respond(200, json={})
    assert client.complete(job_id, _completion(), cancel=threading.Event()) is Delivery.DELIVERED
    assert route.call_count == 1
    assert route.calls.last.request.headers["Idempotency-Key"] == encoded


@respx.mock
def test_a_result_for_a_very_long_id_carries_a_hashed_key(client):
    job_id = "y" * 1000
    route = respx.post(f"{CLUSTER}/jobs/{job_id}/complete").respond(200, json={})
    assert client.complete(job_id, _completion(), cancel=threading.Event()) is Delivery.DELIVERED
    assert route.calls.last.request.headers["Idempotency-Key"] == "sha256:" + hashlib.sha256(job_id.encode()).hexdigest()


@respx.mock
def test_every_job_endpoint_percent_encodes_the_id(client):
    start = respx.post(f"{CLUSTER}/jobs/a%0Ab/start").respond(200, json={})
    logs = respx.post(f"{CLUSTER}/jobs/a%0Ab/logs").respond(200, json={"cancel": True})
    complete = respx.post(f"{CLUSTER}/jobs/a%0Ab/complete").respond(200, json={})
    cancel = threading.Event()
    assert client.start("a\nb", started_at="2026-01-01T00:00:00Z", container_id="c", gpu_ids=[], cancel=cancel)
    assert client.logs("a\nb", offset=0, data="hi", cancel=cancel) is True
    assert client.complete("a\nb", _completion(), cancel=cancel) is Delivery.DELIVERED
    assert start.call_count == logs.call_count == complete.call_count == 1


@respx.mock
def test_a_request_that_cannot_be_built_is_not_retried(client):
    # A header value httpx cannot encode: every attempt would fail the same way, so none is retried.
    route = respx.post(f"{CLUSTER}/jobs/poll").respond(200, json={"jobs": []})
    client.set_token("tökén")
    with pytest.raises(RequestNotSendable, match="cannot be built"):
        _poll(client)  # a poll is otherwise retried until cancelled
    assert route.call_count == 0


@respx.mock
def test_a_body_json_cannot_carry_is_not_retried(client):
    # Completions and heartbeats are dumped in pydantic's JSON mode first (NaN becomes null); this is the net
    # under anything else.
    route = respx.post(f"{CLUSTER}/jobs/poll").respond(200, json={"jobs": []})
    with pytest.raises(RequestNotSendable, match="cannot be sent as JSON"):
        client._transport.send("jobs/poll", {"x": float("nan")}, cancel=threading.Event())
    assert route.call_count == 0


@respx.mock
@pytest.mark.parametrize("error", [httpx.LocalProtocolError("illegal header value"), httpx.InvalidURL("bad url")])
def test_a_request_refused_on_sending_is_not_retried(client, error):
    route = respx.post(f"{CLUSTER}/jobs/job-1/complete").mock(side_effect=error)
    with pytest.raises(RequestNotSendable):
        client.complete("job-1", _completion(), cancel=threading.Event())
    assert route.call_count == 1


@respx.mock
def test_lone_surrogates_in_a_body_are_sent_escaped(client):
    route = respx.post(f"{CLUSTER}/jobs/poll").respond(200, json={"jobs": []})
    client.poll(1, wait_seconds=0, running_job_ids=["\ud800", "é"], free_gpus=0, cancel=threading.Event())
    assert json.loads(route.calls.last.request.content)["running_job_ids"] == ["\ud800", "é"]


# --- deadlines and size bounds, against a real server on raw sockets ----------------------------------------

class RawServer:
    """A tiny HTTP/1.1 server on raw sockets: each connection reads one request and gets the next answer.

    An answer is a function (connection, stop) that writes whatever it likes; the last one repeats. Nothing here
    is an HTTP library, so it can misbehave in ways a real server would not: trickle, hold, send too much.
    """

    def __init__(self, *answers) -> None:
        self._answers = list(answers)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.requests: list[bytes] = []
        self._sock = socket.create_server(("127.0.0.1", 0))
        self._sock.settimeout(0.2)
        self.port = self._sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:
                continue
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        with conn:
            try:
                head = _read_request(conn)
                with self._lock:
                    self.requests.append(head)
                    answer = self._answers.pop(0) if len(self._answers) > 1 else self._answers[0]
                answer(conn, self._stop)
            except OSError:
                pass  # the client gave up on us, as it should

    def close(self) -> None:
        self._stop.set()
        self._sock.close()


def _read_request(conn: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            raise ConnectionResetError
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))
    while len(body) < length:
        body += conn.recv(65536)
    return head


def _json_answer(body, status=200):
    def answer(conn, stop):
        data = json.dumps(body).encode()
        conn.sendall(
            f"HTTP/1.1 {status} OK\r\nContent-Type: application/json\r\nContent-Length: {len(data)}\r\n"
            f"Connection: close\r\n\r\n".encode() + data
        )
    return answer


def _trickle(head: bytes, drip: bytes, every: float = 0.5, give_up: float = 20.0):
    """Sends `head` at once, then `drip` a byte every `every` s (giving up after `give_up` s, so a failing test
    fails rather than hangs)."""

    def answer(conn, stop):
        conn.sendall(head)
        deadline = time.monotonic() + give_up
        for byte in itertools.cycle(drip):
            if stop.wait(every) or time.monotonic() > deadline:
                return
            conn.sendall(bytes([byte]))
    return answer


TRICKLED_BODY = _trickle(
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n", b'{"jobs": []' + b" " * 50
)
TRICKLED_HEAD = _trickle(b"", b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Pad: " + b"a" * 10000)


def _huge_answer(size: int, status: int = 200):
    def answer(conn, stop):
        conn.sendall(f"HTTP/1.1 {status} OK\r\nContent-Length: {size}\r\n\r\n".encode())
        piece = b"0" * (1024 * 1024)
        sent = 0
        while sent < size and not stop.is_set():
            conn.sendall(piece[: size - sent])
            sent += len(piece)
    return answer


def _huge_chunked_answer(size: int):
    """No Content-Length: the size shows only while reading (the bound must hold while streaming)."""

    def answer(conn, stop):
        conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        piece = b"0" * (1024 * 1024)
        sent = 0
        while sent <= size and not stop.is_set():
            conn.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
            sent += len(piece)
        conn.sendall(b"0\r\n\r\n")
    return answer


def _hold(conn, stop):
    stop.wait(30)


@pytest.fixture
def raw_server():
    servers = []

    def start(*answers):
        servers.append(RawServer(*answers))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def _raw_client(server, request_timeout=1.0, **kwargs):
    return ControlPlaneClient(
        f"http://127.0.0.1:{server.port}", "c1", "tenant-a", token=TOKEN, retry=FAST, request_timeout=request_timeout,
        **kwargs,
    )


@pytest.mark.parametrize("trickle", [TRICKLED_BODY, TRICKLED_HEAD], ids=["body", "headers"])
def test_a_trickled_poll_answer_is_cut_off_at_the_deadline(raw_server, trickle):
    # wait 1 s + request timeout 1 s: a 2 s deadline. Each byte arrives well within the read timeout, so only an
    # overall deadline ends this answer; then the retry gets the job.
    server = raw_server(trickle, _json_answer({"jobs": [GOOD_JOB]}, 200))
    client = _raw_client(server)
    started = time.monotonic()
    result = client.poll(1, wait_seconds=1.0, running_job_ids=[], free_gpus=0, cancel=threading.Event())
    elapsed = time.monotonic() - started
    client.close()
    assert result.jobs == [GOOD_JOB]
    assert len(server.requests) == 2
    assert elapsed < 3 * 2.0, f"the poll took {elapsed:.1f} s against a 2 s deadline"


@pytest.mark.parametrize("trickle", [TRICKLED_BODY, TRICKLED_HEAD], ids=["body", "headers"])
def test_a_request_past_its_deadline_fails_like_a_timeout(raw_server, trickle, caplog):
    server = raw_server(trickle)
    client = _raw_client(server)
    started = time.monotonic()
    with pytest.raises(ControlPlaneUnavailable, match="deadline of 1 s"):
        client.exchange_token("ott", cancel=threading.Event(), attempts=1)
    elapsed = time.monotonic() - started
    client.close()
    assert elapsed < 3 * 1.0, f"the request took {elapsed:.1f} s against a 1 s deadline"


def test_a_trickled_body_of_an_accepted_result_does_not_resend_it(raw_server):
    # The 2xx is the outcome of a complete: a body that never ends must not make the agent deliver it forever.
    server = raw_server(TRICKLED_BODY)
    client = _raw_client(server)
    started = time.monotonic()
    assert client.complete("job-1", _completion(), cancel=threading.Event()) is Delivery.DELIVERED
    elapsed = time.monotonic() - started
    client.close()
    assert len(server.requests) == 1
    assert elapsed < 3 * 1.0, f"the complete took {elapsed:.1f} s against a 1 s deadline"


@pytest.mark.parametrize("huge", [_huge_answer, _huge_chunked_answer], ids=["announced", "streamed"])
def test_an_oversized_poll_answer_is_a_clear_error(raw_server, huge):
    server = raw_server(huge(POLL_ANSWER_LIMIT + 1))
    client = _raw_client(server, request_timeout=10.0)
    with pytest.raises(MalformedResponse, match=r"larger than the 64 MiB bound"):
        client.poll(1, wait_seconds=0, running_job_ids=[], free_gpus=0, cancel=threading.Event())
    client.close()


@pytest.mark.parametrize("huge", [_huge_answer, _huge_chunked_answer], ids=["announced", "streamed"])
def test_an_oversized_answer_of_other_endpoints_is_a_clear_error(raw_server, huge):
    server = raw_server(huge(ANSWER_LIMIT + 1))
    client = _raw_client(server, request_timeout=10.0)
    with pytest.raises(MalformedResponse, match=r"larger than the 1 MiB bound"):
        client.exchange_token("ott", cancel=threading.Event())
    # A heartbeat needs only the status: an oversized 2xx body does not fail it.
    client.heartbeat("active", Capabilities(cpu_count=1, memory_gb=1, gpu_count=0), cancel=threading.Event())
    client.close()


def test_an_oversized_error_answer_still_names_its_status(raw_server):
    server = raw_server(_huge_answer(50 * 1024 * 1024, status=500))
    client = _raw_client(server, request_timeout=10.0)
    with pytest.raises(ControlPlaneUnavailable, match="HTTP 500"):
        client.heartbeat("active", Capabilities(cpu_count=1, memory_gb=1, gpu_count=0), cancel=threading.Event(),
                         attempts=1)
    client.close()


def test_a_header_h11_refuses_is_not_retried(raw_server):
    server = raw_server(_json_answer({"jobs": []}))
    client = _raw_client(server)
    client.set_token("tok\r\nX-Forged: 1")
    with pytest.raises(RequestNotSendable):
        _poll(client)
    client.close()
    assert server.requests == []


def test_interrupt_still_breaks_off_a_held_poll(raw_server):
    server = raw_server(_hold)
    client = _raw_client(server, request_timeout=30.0)
    interrupt = threading.Event()
    threading.Timer(0.5, lambda: (interrupt.set(), client.interrupt_poll())).start()
    started = time.monotonic()
    with pytest.raises(PollInterrupted):
        client.poll(0, wait_seconds=25, running_job_ids=[], free_gpus=0, cancel=threading.Event(), interrupt=interrupt)
    assert time.monotonic() - started < 10
    client.close()


# --- the same over TLS: the TLS stream gets the deadline and the interrupt too -----------------------------

@pytest.fixture
def tls_files(tmp_path, monkeypatch):
    if shutil.which("openssl") is None:
        pytest.skip("no openssl to make a test certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
         "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        check=True, capture_output=True,
    )
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # httpx trusts it; the client is built after this
    return cert, key


def _tls(answer, cert, key):
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)

    def tls_answer(conn, stop):
        with context.wrap_socket(conn, server_side=True) as tls:
            _read_request(tls)
            answer(tls, stop)

    return tls_answer


class _TlsServer(RawServer):
    """The handshake and the request are read by the answer itself (inside TLS)."""

    def _handle(self, conn: socket.socket) -> None:
        with conn:
            try:
                with self._lock:
                    self.requests.append(b"")
                    answer = self._answers.pop(0) if len(self._answers) > 1 else self._answers[0]
                answer(conn, self._stop)
            except (OSError, ssl.SSLError):
                pass


def _tls_client(server, request_timeout=1.0):
    return ControlPlaneClient(
        f"https://localhost:{server.port}", "c1", "tenant-a", token=TOKEN, retry=FAST, request_timeout=request_timeout,
    )


def test_a_trickled_answer_over_tls_is_cut_off_at_the_deadline(tls_files):
    server = _TlsServer(_tls(TRICKLED_BODY, *tls_files), _tls(_json_answer({"jobs": [GOOD_JOB]}), *tls_files))
    client = _tls_client(server)
    started = time.monotonic()
    try:
        result = client.poll(1, wait_seconds=1.0, running_job_ids=[], free_gpus=0, cancel=threading.Event())
    finally:
        client.close()
        server.close()
    assert result.jobs == [GOOD_JOB]
    assert time.monotonic() - started < 3 * 2.0


def test_interrupt_breaks_off_a_held_poll_over_tls(tls_files):
    server = _TlsServer(_tls(_hold, *tls_files))
    client = _tls_client(server, request_timeout=30.0)
    interrupt = threading.Event()
    threading.Timer(1.0, lambda: (interrupt.set(), client.interrupt_poll())).start()
    started = time.monotonic()
    try:
        with pytest.raises(PollInterrupted):
            client.poll(0, wait_seconds=25, running_job_ids=[], free_gpus=0, cancel=threading.Event(),
                        interrupt=interrupt)
    finally:
        client.close()
        server.close()
    assert time.monotonic() - started < 10


@respx.mock
@pytest.mark.parametrize("echo", ["raw", "json"])
def test_a_token_echoed_at_the_cut_of_an_error_quote_leaves_no_prefix_behind(echo):
    """The message quotes 200 characters of an error body: the cut must not leave a token's first part."""
    token = 'tok-"0123456789abcdefghijklmnopqrstuvwxyz'
    client = ControlPlaneClient(BASE, "c1", "tenant-a", token=token, retry=FAST)
    shown = token if echo == "raw" else json.dumps(token)[1:-1]
    respx.post(f"{CLUSTER}/jobs/poll").respond(400, text="x" * 185 + shown + " trailing")
    with pytest.raises(ControlPlaneError) as caught:
        _poll(client)
    assert token[:6] not in str(caught.value) and "[REDACTED]" in str(caught.value)
    client.close()


def test_bad_items_are_quoted_without_a_cut_secret_or_their_contents():
    """A quote is redacted before it is cut (a cut token leaves a prefix no redaction knows); containers are
    described by size only (their contents may be credentials, or nest past any recursion limit)."""
    token = "tok-0123456789abcdefghijklmnop"
    deep: list = []
    for _ in range(5000):
        deep = [deep]
    answer = {
        "jobs": ["A" * 53 + token, {"job_id": 7, "registry_auth": {"password": "Reg1stryPassw0rd-XYZ"}}, deep],
        "cancel_job_ids": ["C" * 53 + token + "!"],
    }
    from cluster_agent.control_plane import _poll_result
    from cluster_agent.redaction import Redactor

    import logging
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("cluster_agent.control_plane").addHandler(handler)
    try:
        result = _poll_result(answer, long_poll=True, secrets=Redactor([token]))
    finally:
        logging.getLogger("cluster_agent.control_plane").removeHandler(handler)
    text = "\n".join(r.getMessage() for r in records)
    assert token[:8] not in text and "Reg1stry" not in text
    assert result.jobs == [answer["jobs"][1]] and result.cancel_job_ids == []


@respx.mock
def test_a_job_nested_past_the_parsers_depth_loses_only_itself(client):
    deep = b"[" * 3000 + b"]" * 3000
    body = b'{"jobs": [{"job_id": "good", "image": "x"}, {"job_id": "deep", "image": "x", "input_payload": ' + deep + b"}]}"
    respx.post(f"{CLUSTER}/jobs/poll").respond(200, content=body, headers={"Content-Type": "application/json"})
    result = _poll(client)
    assert [job["job_id"] for job in result.jobs] == ["good", "deep"]
    assert "x-radix-refused" not in result.jobs[0]
    assert "nests deeper than 200 levels" in result.jobs[1]["x-radix-refused"]
