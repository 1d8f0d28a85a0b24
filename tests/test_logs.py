import base64
import json
import logging
import sys
import urllib.parse

import pytest

from cluster_agent.logs import TRACEBACK_INDENT, JsonFormatter, RedactingFormatter, configure, escape_controls
from cluster_agent.redaction import REPLACEMENT, Redactor

# A token a server would have to escape: quote, backslash, space, '/', '+', non-ASCII.
TOKEN = 'tok"en\\with sp/ace+é-0123456789'
FORGED = "bad\n2026-01-01 00:00:00 INFO    cluster_agent: forged"


def _record(message, *args, exc_info=None, **extra):
    record = logging.LogRecord("cluster_agent.agent", logging.INFO, __file__, 1, message, args, exc_info)
    for key, value in extra.items():
        setattr(record, key, value)
    return record


def _formatters(secret=TOKEN):
    formatters = (RedactingFormatter(), JsonFormatter())
    for formatter in formatters:
        formatter.add_secret(secret)
    return formatters


def _raised(message):
    try:
        raise RuntimeError(message)
    except RuntimeError:
        return sys.exc_info()


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
    text = formatter.format(_record("failed", exc_info=_raised("boom with tok-123456")))
    assert "tok-123456" not in text and "boom with [REDACTED]" in json.loads(text)["exception"]


ECHOES = {
    "raw": TOKEN,
    "json": json.dumps(TOKEN)[1:-1],
    "json, not ensure_ascii": json.dumps(TOKEN, ensure_ascii=False)[1:-1],
    "repr": repr(TOKEN)[1:-1],
    "quote": urllib.parse.quote(TOKEN, safe=""),
    "quote_plus": urllib.parse.quote_plus(TOKEN),
    "base64": base64.b64encode(TOKEN.encode()).decode(),
    "urlsafe base64, no padding": base64.urlsafe_b64encode(TOKEN.encode()).decode().rstrip("="),
    "hex": TOKEN.encode().hex(),
}


@pytest.mark.parametrize("echo", ECHOES.values(), ids=ECHOES.keys())
@pytest.mark.parametrize("as_repr", [False, True], ids=["plain", "!r"])
def test_a_server_echo_of_the_token_is_redacted_in_every_form_and_format(echo, as_repr):
    body = f'{{"error": "bad token {echo}"}}'
    message = f"jobs/poll: answer is not JSON ({body!r})" if as_repr else f"jobs/poll: control plane answered HTTP 500 {body}"
    for formatter in _formatters():
        text = formatter.format(_record("%s", message))
        assert REPLACEMENT in text
        # The line must not carry the token in any encoding, the formatter's own (JSON) included.
        for form in {*ECHOES.values(), json.dumps(TOKEN)[1:-1].replace("\\", "\\\\")}:
            assert form not in text


def test_a_json_escaped_echo_is_redacted_before_the_line_is_encoded():
    # The original bug: json.dumps turned the echoed \" into \\\", which the old after-encoding pass missed.
    formatter = JsonFormatter()
    formatter.add_secret(TOKEN)
    line = formatter.format(_record("heartbeat failed: HTTP 500 %s", json.dumps({"token": TOKEN})))
    assert json.loads(line)["message"] == f'heartbeat failed: HTTP 500 {{"token": "{REPLACEMENT}"}}'


def test_secrets_in_event_fields_are_redacted():
    formatter = JsonFormatter()
    formatter.add_secret(TOKEN)
    line = json.loads(formatter.format(_record("job received", job_id=f"job-{TOKEN}", event="received")))
    assert line["job_id"] == f"job-{REPLACEMENT}"


def test_innocent_text_is_untouched_in_both_formats():
    message = 'job j-1 finished: {"exit_code": 0, "note": "tok en, é, %20, aGVsbG8=, \'quoted\'"}'
    text_formatter, json_formatter = _formatters()
    assert text_formatter.format(_record("%s", message)).endswith(f"cluster_agent.agent: {message}")
    assert json.loads(json_formatter.format(_record("%s", message)))["message"] == message


def test_a_forged_line_in_a_job_id_stays_on_its_record_line():
    text_formatter, json_formatter = _formatters()
    text = text_formatter.format(_record("job %s: received", FORGED))
    assert text.splitlines() == [text]
    assert text.endswith("cluster_agent.agent: job bad\\n2026-01-01 00:00:00 INFO    cluster_agent: forged: received")
    line = json_formatter.format(_record("job %s: received", FORGED, job_id=FORGED, event="received"))
    assert line.splitlines() == [line]
    parsed = json.loads(line)
    assert parsed["message"] == "job bad\\n2026-01-01 00:00:00 INFO    cluster_agent: forged: received"
    assert parsed["job_id"] == FORGED  # a field, JSON-encoded: exact and still on one line


@pytest.mark.parametrize("char, escaped", [
    ("\n", "\\n"), ("\r", "\\r"), ("\t", "\\t"), ("\x00", "\\x00"), ("\x1b", "\\x1b"), ("\x7f", "\\x7f"),
    ("\x85", "\\x85"), ("\x9b", "\\x9b"), ("\u2028", "\\u2028"), ("\u2029", "\\u2029"),
])
def test_control_characters_in_messages_are_escaped_visibly(char, escaped):
    assert escape_controls(f"a{char}b") == f"a{escaped}b"
    text_formatter, json_formatter = _formatters()
    text = text_formatter.format(_record("job %s", f"a{char}b"))
    assert text.splitlines() == [text] and text.endswith(f"job a{escaped}b")
    line = json_formatter.format(_record("job %s", f"a{char}b", job_id=f"a{char}b"))
    assert line.splitlines() == [line]
    parsed = json.loads(line)
    assert parsed["message"] == f"job a{escaped}b" and parsed["job_id"] == f"a{char}b"


def test_text_tracebacks_keep_their_lines_indented_and_redacted():
    formatter = RedactingFormatter()
    formatter.add_secret(TOKEN)
    text = formatter.format(_record("poll failed", exc_info=_raised(f"{FORGED} {json.dumps(TOKEN)}\r\x1b[2J")))
    first, *rest = text.split("\n")
    assert first.endswith("cluster_agent.agent: poll failed")
    assert rest[0] == TRACEBACK_INDENT + "Traceback (most recent call last):"
    # Every traceback line is indented: the forged timestamp line cannot pass for a record.
    assert all(line.startswith(TRACEBACK_INDENT) for line in rest)
    assert rest[-2:] == [
        TRACEBACK_INDENT + "RuntimeError: bad",
        TRACEBACK_INDENT + f'2026-01-01 00:00:00 INFO    cluster_agent: forged "{REPLACEMENT}"\\r\\x1b[2J',
    ]
    assert "tok" not in text


def test_json_tracebacks_stay_inside_their_string_and_are_redacted():
    formatter = JsonFormatter()
    formatter.add_secret(TOKEN)
    line = formatter.format(_record("poll failed", exc_info=_raised(f"{FORGED} {TOKEN}\u2028")))
    assert line.splitlines() == [line] and "tok" not in line
    exception = json.loads(line)["exception"]
    assert exception.startswith("Traceback (most recent call last):\n")
    assert exception.endswith(f"RuntimeError: {FORGED} {REPLACEMENT}\\u2028")


def test_stack_info_is_redacted_and_indented():
    formatter = RedactingFormatter()
    formatter.add_secret(TOKEN)
    record = _record("where")
    record.stack_info = f"Stack (most recent call last):\n  File x, in {TOKEN}"
    text = formatter.format(record)
    assert text.split("\n")[1:] == [TRACEBACK_INDENT + "Stack (most recent call last):",
                                    TRACEBACK_INDENT + f"  File x, in {REPLACEMENT}"]


def test_a_secret_matching_across_json_syntax_withholds_the_record_rather_than_break_the_line():
    formatter = JsonFormatter()
    formatter.add_secret('info", "logger')  # absurd, but possible: only the encoded line contains it
    line = json.loads(formatter.format(_record("hello")))
    assert line["message"].startswith(f"{REPLACEMENT} (record withheld") and "hello" not in line["message"]


def test_the_redactor_is_shared_and_add_secret_delegates_to_it():
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    shared = Redactor()
    try:
        formatter = configure("INFO", "json", redactor=shared)
        assert formatter.redactor is shared
        formatter.add_secret(TOKEN)
        assert shared.redact(TOKEN) == REPLACEMENT
        assert isinstance(configure("INFO").redactor, Redactor)
    finally:
        root.handlers[:], root.level = handlers, level


def test_a_running_jobs_value_is_hidden_in_messages_but_cannot_break_every_record():
    """A job's secret_env value is the job's choice: matched over the whole encoded line, '"ts": "2026-' withheld
    every JSON record while the job ran, and "cluster_agent" blanked every text line's logger."""
    for value in ('"ts": "2026-', "cluster_agent", '", "level": "'):
        for formatter in _formatters():
            job = Redactor([value, "job-secret-42"])
            formatter.redactor.attach(job)
            line = formatter.format(_record("job j1: finished; it printed job-secret-42"))
            formatter.redactor.detach(job)
            assert "job-secret-42" not in line and "withheld" not in line, line
            if isinstance(formatter, JsonFormatter):
                record = json.loads(line)
                assert record["logger"] == "cluster_agent.agent" and record["level"] == "info"
                assert record["ts"].startswith("20")
            else:
                assert "cluster_agent.agent:" in line
