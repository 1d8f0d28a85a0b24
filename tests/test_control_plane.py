import json
import threading

import httpx
import pytest
import respx
from tenacity import RetryCallState

from cluster_agent.control_plane import ControlPlaneClient, Delivery, RetryPolicy, _BackoffWait
from cluster_agent.errors import ControlPlaneUnavailable, MalformedResponse, TokenRejected
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
    respx.post(f"{CLUSTER}/jobs/poll").respond(200, json={"jobs": [{"job_id": "a"}, "junk"], "cancel_job_ids": ["b"]})
    result = _poll(client)
    assert result.jobs == [{"job_id": "a"}, "junk"]
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
        httpx.Response(200, json={"jobs": "not-a-list"}),
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
