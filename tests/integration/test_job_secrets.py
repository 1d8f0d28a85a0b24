"""Job secrets (secret_env) end to end through the dev control plane: the job gets the value; its streamed log, its
result (output.json, stdout JSON, the wrapped tails, the failure message) and the agent's log never show it, in any
encoding, even split across two log chunks."""

from __future__ import annotations

import base64
import json

from .conftest import eventually

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


def test_one_jobs_secret_never_shows_in_anothers_result(cp, start_agent, busybox):
    """Redacting a job's result with every job's secrets would let a tenant test guesses at another's: a guess that
    comes back "[REDACTED]" is right. Two jobs at once: the prober's own stderr comes back as it printed it."""
    start_agent("--max-concurrent-jobs", "2")
    victim = cp.submit(command=["sh", "-c", "sleep 4"], secret_env={"DB_PASSWORD": "Summer2024!x"})
    eventually(lambda: cp.result_now(victim)["started"], what="the victim job running")
    prober = cp.run(command=["sh", "-c", "sleep 1; echo 'guess:Winter2023!x guess:Summer2024!x' >&2; exit 1"])
    assert prober["failure_reason"] == "exit_code"
    assert "guess:Summer2024!x" in prober["error_message"], prober["error_message"]
    assert cp.result(victim)["result"]["status"] == "succeeded"


def test_a_secret_split_inside_a_character_is_redacted_in_the_streamed_log(cp, start_agent, busybox):
    start_agent()
    secret = "pässwörd-secret"
    record = cp.result(cp.submit(
        command=["sh", "-c", "printf 'leak:p\\303'; sleep 1; printf '\\244sswörd-secret end\\n'"],
        secret_env={"PW": secret}))
    assert record["result"]["status"] == "succeeded"
    assert "leak:[REDACTED] end" in record["log"] and secret not in record["log"], record["log"]


def test_a_secret_in_an_artifacts_name_or_an_unquoted_number_stays_out_of_the_result(cp, start_agent, busybox):
    start_agent()
    pin = "4111111111111111"
    record = cp.result(cp.submit(
        command=["sh", "-c", 'mkdir out; echo x > "out/$TOK.txt"; echo y > out/plain.txt; '
                             'printf \'{"pin": %s}\' "$PIN" > output.json'],
        secret_env={"TOK": SECRET, "PIN": pin}, artifacts=["out/*"]))
    result = record["result"]
    assert result["output_payload"] == {"pin": "[REDACTED]"}
    assert [a["path"] for a in result["artifacts"]] == ["out/plain.txt"]  # the other was not uploaded
    assert {"path": "out/[REDACTED].txt",
            "error": "skipped: its path holds one of the job's secret_env values; not uploaded"} in result["artifact_errors"]
    assert not leaks(json.dumps(record["result"])) and pin not in json.dumps(record["result"])


def test_a_secret_near_the_cut_of_the_results_tails_leaves_no_part(cp, start_agent, busybox):
    start_agent()
    result = cp.run(command=["sh", "-c", 'printf %s "$TOK"; head -c 9980 /dev/zero | tr "\\0" x'],
                    secret_env={"TOK": SECRET})
    stdout = result["output_payload"]["stdout"]
    assert stdout.endswith("x" * 9980) and not any(SECRET[-k:] in stdout for k in range(6, len(SECRET))), stdout[:60]


def test_a_huge_integer_in_a_jobs_output_still_gets_its_result(cp, start_agent, busybox):
    """Past a double's range, the check for a numeric secret raised on the job's thread: no result, ever."""
    start_agent()
    digits = "1" + "0" * 400
    result = cp.run(command=["sh", "-c", f"echo '{{\"x\": {digits}, \"t\": \"'$TOKEN'\"}}'"],
                    secret_env={"TOKEN": SECRET})
    assert result["status"] == "succeeded", result
    assert result["output_payload"] == {"x": int(digits), "t": "[REDACTED]"}
