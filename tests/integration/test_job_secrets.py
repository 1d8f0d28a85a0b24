"""Job secrets (secret_env) end to end through the dev control plane: the job gets the value; its streamed log, its
result (output.json, stdout JSON, the wrapped tails, the failure message) and the agent's log never show it, in any
encoding, even split across two log chunks."""

from __future__ import annotations

import base64
import json

SECRET = "pA55w0rd-xyz-2026"


def leaks(text: str) -> list[str]:
    forms = [SECRET, base64.b64encode(SECRET.encode()).decode(), SECRET.replace("-", "%2D")]
    return [form for form in forms if form in text]


def test_a_secret_echoed_everywhere_is_redacted(cp, start_agent, busybox):
    agent = start_agent()
    half = len(SECRET) // 2
    script = (
        'echo "stdout: $TOKEN"; echo "stderr: $TOKEN" >&2; '
        f'printf "split: {SECRET[:half]}"; sleep 1; printf "{SECRET[half:]}\\n"; '  # two log chunks
        'echo "b64: $(printf %s "$TOKEN" | base64)"; '
        'printf \'{"echo": "%s", "len": %d}\' "$TOKEN" "${#TOKEN}" > output.json'
    )
    job_id = cp.submit(command=["sh", "-c", script], secret_env={"TOKEN": SECRET})
    record = cp.result(job_id)
    result = record["result"]
    assert result["status"] == "succeeded", result
    assert result["output_payload"] == {"echo": "[REDACTED]", "len": len(SECRET)}  # the job had the real value
    log = record["log"]
    assert "[REDACTED]" in log and not leaks(log), log
    assert not leaks(json.dumps({k: v for k, v in record.items() if k != "spec"})) and not leaks(agent.log)


def test_a_secret_in_a_failure_message_and_in_wrapped_output_is_redacted(cp, start_agent, busybox):
    agent = start_agent()
    result = cp.run(command=["sh", "-c", 'echo "oops $TOKEN" >&2; echo "plain $TOKEN"; exit 3'],
                    secret_env={"TOKEN": SECRET})
    assert result["failure_reason"] == "exit_code"
    assert "[REDACTED]" in result["error_message"] and not leaks(json.dumps(result)), result
    assert result["output_payload"]["stdout"] == "plain [REDACTED]\n"
    assert not leaks(agent.log)


def test_a_short_secret_is_refused_as_unmaskable(cp, start_agent, busybox):
    start_agent()
    result = cp.run(command=["true"], secret_env={"TOKEN": "abc"})
    assert result["failure_reason"] == "invalid_job" and "cannot be masked" in result["error_message"]
