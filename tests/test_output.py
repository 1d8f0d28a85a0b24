import json
import os

import pytest

from cluster_agent.errors import JobFailed
from cluster_agent.models import FailureReason, OutputSource
from cluster_agent.output import TAIL_CHARS, OutputCollector, resolve_output

LIMIT = 1000


def collector(stdout=b"", stderr=b"", limit=LIMIT):
    c = OutputCollector(limit)
    if stdout:
        c.feed_stdout(stdout)
    if stderr:
        c.feed_stderr(stderr)
    return c


def test_output_json_comes_first(tmp_path):
    (tmp_path / "output.json").write_text('{"from": "file"}')
    payload, source = resolve_output(tmp_path, collector(b'{"from": "stdout"}'), LIMIT)
    assert payload == {"from": "file"} and source is OutputSource.OUTPUT_JSON


def test_output_json_may_hold_any_json_value(tmp_path):
    (tmp_path / "output.json").write_text("null")
    assert resolve_output(tmp_path, collector(b'{"a": 1}'), LIMIT) == (None, OutputSource.OUTPUT_JSON)


def test_stdout_that_is_one_json_document(tmp_path):
    payload, source = resolve_output(tmp_path, collector(b'  {"n": 1,\n "m": [2]}\n'), LIMIT)
    assert payload == {"n": 1, "m": [2]} and source is OutputSource.STDOUT_JSON


def test_stdout_json_fed_in_pieces(tmp_path):
    c = OutputCollector(LIMIT)
    for piece in (b'{"a"', b": ", b"[1, 2", b"]}"):
        c.feed_stdout(piece)
    assert resolve_output(tmp_path, c, LIMIT) == ({"a": [1, 2]}, OutputSource.STDOUT_JSON)


@pytest.mark.parametrize("stdout", [b"", b"hello\n", b'{"a": 1}\n{"b": 2}\n', b"   \n"])
def test_anything_else_is_wrapped(tmp_path, stdout):
    payload, source = resolve_output(tmp_path, collector(stdout, b"warn\n"), LIMIT)
    assert source is OutputSource.WRAPPED
    assert payload == {"stdout": stdout.decode(), "stderr": "warn\n"}


def test_wrapped_output_keeps_the_last_10000_characters(tmp_path):
    stdout = ("x" * 20_000 + "END").encode()
    stderr = ("é" * 30_000 + "LAST").encode()
    payload, _ = resolve_output(tmp_path, collector(stdout, stderr), LIMIT)
    assert len(payload["stdout"]) == TAIL_CHARS and payload["stdout"].endswith("END")
    assert len(payload["stderr"]) == TAIL_CHARS and payload["stderr"].endswith("LAST")


def test_stdout_over_the_limit_is_not_taken_as_json(tmp_path):
    big = json.dumps({"data": "x" * (LIMIT * 2)}).encode()
    payload, source = resolve_output(tmp_path, collector(big), LIMIT)
    assert source is OutputSource.WRAPPED


def test_collector_memory_is_bounded_whatever_the_job_prints():
    c = OutputCollector(LIMIT)
    chunk = b"line of output\n" * 1000
    for _ in range(2000):  # 30 MB
        c.feed_stdout(chunk)
        c.feed_stderr(chunk)
    assert c.stdout_bytes == 2000 * len(chunk)
    assert c.stdout_document() is None  # not JSON: nothing kept whole
    assert len(c._stdout_tail._buf) <= 4 * TAIL_CHARS and len(c._stderr_tail._buf) <= 4 * TAIL_CHARS


def test_invalid_output_json_is_invalid_output(tmp_path):
    (tmp_path / "output.json").write_text("{not json")
    with pytest.raises(JobFailed) as caught:
        resolve_output(tmp_path, collector(), LIMIT)
    assert caught.value.reason is FailureReason.INVALID_OUTPUT and "not valid JSON" in str(caught.value)


def test_oversized_output_json_is_invalid_output(tmp_path):
    (tmp_path / "output.json").write_text(json.dumps({"x": "y" * LIMIT}))
    with pytest.raises(JobFailed) as caught:
        resolve_output(tmp_path, collector(), LIMIT)
    assert caught.value.reason is FailureReason.INVALID_OUTPUT and "over the output limit" in str(caught.value)


def test_output_json_symlink_is_not_followed(tmp_path):
    secret = tmp_path.parent / "host-secret.json"
    secret.write_text('{"secret": true}')
    os.symlink(secret, tmp_path / "output.json")
    with pytest.raises(JobFailed, match="symbolic link"):
        resolve_output(tmp_path, collector(), LIMIT)


def test_output_json_directory_is_invalid_output(tmp_path):
    (tmp_path / "output.json").mkdir()
    with pytest.raises(JobFailed) as caught:
        resolve_output(tmp_path, collector(), LIMIT)
    assert caught.value.reason is FailureReason.INVALID_OUTPUT


import pytest  # noqa: E402

from cluster_agent.output import MAX_OUTPUT_DEPTH, parse_output  # noqa: E402


@pytest.mark.parametrize("data, why", [
    (b"[1, NaN]", "NaN is not JSON"),
    (b'{"a": -Infinity}', "-Infinity is not JSON"),
    (b"[1e999]", "out of range"),
    (b"[" * 300 + b"]" * 300, f"over the {MAX_OUTPUT_DEPTH}"),
    (b"[" * 5000 + b"]" * 5000, "deeper than any JSON parser"),
    (b"[" * 5000, "deeper than any JSON parser"),
])
def test_outputs_that_cannot_be_a_result_name_why(data, why):
    with pytest.raises(ValueError) as caught:
        parse_output(data)
    assert why in str(caught.value)


def test_a_deep_but_carryable_output_is_fine():
    assert parse_output(b"[" * MAX_OUTPUT_DEPTH + b"]" * MAX_OUTPUT_DEPTH)


def test_the_tails_are_redacted_before_they_are_cut():
    """A secret near the start of the last 10,000 characters: cut first, its end matched nothing and went out."""
    from cluster_agent.output import OutputCollector, wrapped_output
    from cluster_agent.redaction import Redactor

    secret = "SECRETabcdefghijklmnopqrstuvwxyz01234567"
    for padding in (9980, 9990, 9999, 10_000):
        collected = OutputCollector(1 << 20, Redactor([secret]))
        data = secret.encode() + b"x" * padding
        for i in range(0, len(data), 7):
            collected.feed_stdout(data[i:i + 7])
        collected.feed_stderr(b"err " + secret.encode()[-30:])  # a part alone is no secret: kept
        tails = wrapped_output(collected)
        assert not any(secret[-k:] in tails["stdout"] for k in range(6, len(secret))), padding
        assert tails["stdout"].endswith("x" * 100) and len(tails["stdout"]) <= 10_000
