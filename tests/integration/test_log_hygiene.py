"""The real agent process against a hostile control plane: the token it echoes back never reaches the log.

The stub answers heartbeats and polls with HTTP 500 (the first poll with 400) and a body that echoes the
X-Radix-Cluster-Token header it received, in a different encoding each time. The agent logs every one of those
answers; with `--log-format json` its stderr must carry none of the token's forms, "[REDACTED]" in their place, and
exactly one JSON record per line.
"""

from __future__ import annotations

import base64
import http.server
import json
import os
import signal
import subprocess
import threading
import urllib.parse
from pathlib import Path
from typing import Callable, Iterator

import pytest

from tests.integration.conftest import ROOT, agent_command, eventually

# Everything a server has to escape or encode: quote, backslash, '+', '/', '=', a space.
HOSTILE_TOKEN = 'it"tok\\en+/Zx9 0123456789+/=ab'
ECHO_HEADER = "X-Radix-Cluster-Token"
FORGED = '{"level": "info", "message": "forged"}'


def _b64(data: str, encode: Callable[[bytes], bytes] = base64.b64encode) -> str:
    return encode(data.encode()).decode()


# label -> body echoing the token it is given. Each body stays far under the 200 characters the agent quotes.
ECHOES: dict[str, Callable[[str], str]] = {
    "raw": lambda token: f"echo raw: {token}",
    "json": lambda token: json.dumps({"error": "echo json", "token": token}),
    "base64": lambda token: f"echo base64: {_b64(token)}",
    "basic": lambda token: f"echo basic: Basic {_b64('user:' + token)}",
    "urlsafe": lambda token: f"echo urlsafe: {_b64(token, base64.urlsafe_b64encode).rstrip('=')}",
    "percent": lambda token: f"echo percent: {urllib.parse.quote(token, safe='')}",
    "plus": lambda token: f"echo plus: {urllib.parse.quote_plus(token)}",
    # Line breaks the agent does not strip from answers, each before a record of its own: none may start a line.
    "forged": lambda token: f"echo forged:\r{FORGED}\u2028{FORGED}\x85{FORGED} {token}",
}


def token_forms(token: str) -> set[str]:
    """What must not appear anywhere in the log: the token as sent and as the agent's JSON log would encode it."""
    basic = _b64("user:" + token)
    forms = {
        token, json.dumps(token)[1:-1], json.dumps(json.dumps(token)[1:-1])[1:-1], repr(token)[1:-1],
        _b64(token), _b64(token).rstrip("="), _b64(token, base64.urlsafe_b64encode).rstrip("="),
        urllib.parse.quote(token, safe=""), urllib.parse.quote_plus(token), token.encode().hex(),
        basic[len(_b64("user:")):-4],  # the part of the Basic blob made of the token's bytes alone
    }
    assert all(len(form) >= 20 for form in forms)
    return forms


def test_every_echo_fits_in_what_the_agent_quotes_of_an_answer():
    # control_plane.py quotes the first 200 characters of an error body; a cut token would defeat this test.
    assert all(len(echo(HOSTILE_TOKEN)) < 200 for echo in ECHOES.values())


class EchoingControlPlane:
    """A real HTTP server on 127.0.0.1: heartbeat and poll fail, echoing the token; all else is 404."""

    def __init__(self) -> None:
        self.requests = 0
        self.echoed: list[str] = []
        self._lock = threading.Lock()
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def _answer(self, path: str, token: str) -> tuple[int, str]:
        if not path.endswith(("/heartbeat", "/jobs/poll")):
            return 404, "not here"
        with self._lock:
            labels = list(ECHOES)
            label = labels[self.requests % len(labels)]
            first_poll = path.endswith("/jobs/poll") and not any(p for p in self.echoed if p.startswith("poll"))
            self.requests += 1
            self.echoed.append(f"{'poll' if path.endswith('/jobs/poll') else 'heartbeat'}:{label}")
        return (400 if first_poll else 500), ECHOES[label](token)

    def _handler(self) -> type[http.server.BaseHTTPRequestHandler]:
        plane = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - the http.server API
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                status, body = plane._answer(self.path, self.headers.get(ECHO_HEADER, ""))
                data = body.encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json" if body.startswith("{") else "text/plain; charset=utf-8")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - quiet test output
                pass

        return Handler

    def __enter__(self) -> EchoingControlPlane:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture
def echoing_plane() -> Iterator[EchoingControlPlane]:
    with EchoingControlPlane() as plane:
        yield plane


def _start(plane: EchoingControlPlane, tmp_path: Path, token: str) -> tuple[subprocess.Popen, Path]:
    stderr_path = tmp_path / "agent.stderr"
    args = [
        "--api-base", plane.url, "--cluster-id", "hygiene-test", "--cluster-token", token,
        "--jobs-workdir", str(tmp_path / "jobs"), "--token-file", str(tmp_path / "token"),
        "--log-format", "json", "--metrics-port", "0", "--heartbeat-interval", "1", "--poll-interval", "1",
        "--long-poll-seconds", "1", "--shutdown-grace", "5",
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith("RADIX_")} | {"PYTHONUNBUFFERED": "1"}
    with open(stderr_path, "wb") as stderr, open(tmp_path / "agent.stdout", "wb") as stdout:
        proc = subprocess.Popen(agent_command(*args), cwd=ROOT, stdout=stdout, stderr=stderr, env=env)
    return proc, stderr_path


def test_an_echoed_token_reaches_the_json_log_in_no_form(docker_client, echoing_plane, tmp_path):
    proc, stderr_path = _start(echoing_plane, tmp_path, HOSTILE_TOKEN)
    try:
        # Every echo has been answered and logged (the label precedes the token, so it survives redaction).
        eventually(lambda: all(f"echo {label}" in stderr_path.read_text(errors="replace") for label in ECHOES),
                   timeout=60, what=f"every echo logged: {stderr_path.read_text(errors='replace')[-3000:]}")
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    log = stderr_path.read_text(errors="replace")
    output = log + (tmp_path / "agent.stdout").read_text(errors="replace")

    for form in token_forms(HOSTILE_TOKEN):
        assert form not in output, f"token form {form!r} leaked into the log"
    assert "[REDACTED]" in log and "HTTP 400" in log and "HTTP 500" in log

    # One record per line: every line is a JSON object, and no decoded message carries the token either.
    # splitlines() splits on \r, \x85 and \u2028 too, as some log readers do.
    records = []
    for line in log.splitlines():
        assert line.strip(), "empty line in the JSON log"
        record = json.loads(line)
        assert isinstance(record, dict) and {"ts", "level", "logger", "message"} <= set(record)
        records.append(record)
    messages = "\n".join(str(value) for record in records for value in record.values())
    for form in token_forms(HOSTILE_TOKEN):
        assert form not in messages
    assert sum("[REDACTED]" in record["message"] for record in records) >= len(ECHOES)
    assert not any(record["message"] == "forged" for record in records)
    assert any(record["message"] == "agent stopped" for record in records), "the agent did not shut down cleanly"
