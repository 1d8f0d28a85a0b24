import json
import logging

from cluster_agent.logs import JsonFormatter, RedactingFormatter


def _record(message, *args, **extra):
    record = logging.LogRecord("cluster_agent.agent", logging.INFO, __file__, 1, message, args, None)
    for key, value in extra.items():
        setattr(record, key, value)
    return record


def test_json_lines_carry_the_event_fields():
    line = json.loads(JsonFormatter().format(_record(
        "job %s: finished", "j1", job_id="j1", event="finished", duration_s=1.5, status="succeeded")))
    assert line["message"] == "job j1: finished"
    assert line["job_id"] == "j1" and line["event"] == "finished" and line["duration_s"] == 1.5
    assert line["status"] == "succeeded" and line["level"] == "info" and line["ts"].endswith("+00:00")


def test_secrets_are_redacted_in_both_formats():
    for formatter in (RedactingFormatter(), JsonFormatter()):
        formatter.add_secret("tok-123456")
        text = formatter.format(_record("sent header %s", "X-Radix-Cluster-Token: tok-123456"))
        assert "tok-123456" not in text and "[REDACTED]" in text


def test_exceptions_are_redacted_too():
    formatter = JsonFormatter()
    formatter.add_secret("tok-123456")
    try:
        raise RuntimeError("boom with tok-123456")
    except RuntimeError:
        import sys

        record = _record("failed")
        record.exc_info = sys.exc_info()
    text = formatter.format(record)
    assert "tok-123456" not in text and "boom with [REDACTED]" in json.loads(text)["exception"]
