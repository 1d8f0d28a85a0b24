"""Failure classes: whether a failed job is worth trying elsewhere (cluster_agent/failure_class.py)."""

from __future__ import annotations

import pytest

from cluster_agent.failure_class import classify
from cluster_agent.models import Completion, FailureReason, JobMetrics, JobStatus


def failed(reason: FailureReason, message: str = "") -> Completion:
    return Completion(tenant_id="t", status=JobStatus.FAILED, failure_reason=reason, error_message=message,
                      metrics=JobMetrics(runtime_seconds=1.0))


@pytest.mark.parametrize("reason, message, memory_limited, hint, expected", [
    (FailureReason.EXIT_CODE, "exited with code 3", False, None, "job"),
    (FailureReason.INVALID_OUTPUT, "", False, None, "job"),
    (FailureReason.TIMEOUT, "", False, None, "job"),
    (FailureReason.INVALID_JOB, "", False, None, "job"),
    (FailureReason.OOM, "", True, None, "job"),
    (FailureReason.OOM, "", False, None, "infrastructure"),
    (FailureReason.AGENT_ERROR, "container engine error", False, None, "infrastructure"),
    (FailureReason.INTERRUPTED, "", False, None, "infrastructure"),
    (FailureReason.ARTIFACT_UPLOAD_FAILED, "", False, None, "infrastructure"),
    (FailureReason.IMAGE_UNAVAILABLE, "cannot pull image x: manifest unknown", False, None, "job"),
    (FailureReason.IMAGE_UNAVAILABLE, "pull access denied for x, repository does not exist", False, None, "job"),
    (FailureReason.IMAGE_UNAVAILABLE, "Get https://r/v2/: dial tcp: lookup r: no such host", False, None,
     "infrastructure"),
    (FailureReason.IMAGE_UNAVAILABLE, "pulling image x made no progress for 120 s", False, None, "infrastructure"),
    (FailureReason.IMAGE_UNAVAILABLE, "image x is not on this host and --pull-policy is never: load it", False, None,
     "infrastructure"),
    (FailureReason.INPUT_UNAVAILABLE, "HTTP 404", False, False, "job"),
    (FailureReason.INPUT_UNAVAILABLE, "gave up after 6 attempts", False, True, "infrastructure"),
])
def test_the_table(reason, message, memory_limited, hint, expected):
    metrics = classify(failed(reason, message), memory_limited=memory_limited, retryable=hint).metrics
    assert metrics.failure_class == expected
    assert metrics.retryable is (expected == "infrastructure")


def test_successes_and_cancels_carry_no_class():
    ok = Completion(tenant_id="t", status=JobStatus.SUCCEEDED, metrics=JobMetrics(runtime_seconds=1))
    canceled = Completion.not_run("t", FailureReason.CANCELED, "canceled")
    for completion in (ok, canceled):
        wire = classify(completion, memory_limited=False).to_wire()
        assert "failure_class" not in wire["metrics"] and "retryable" not in wire["metrics"]


def test_a_failed_result_carries_both_on_the_wire():
    wire = classify(failed(FailureReason.AGENT_ERROR), memory_limited=False).to_wire()
    assert wire["metrics"]["failure_class"] == "infrastructure" and wire["metrics"]["retryable"] is True
