"""`python -m devplane serve|submit|jobs|result|cancel|artifacts|artifact`: the development control plane and a
tiny client for it.

Every mistake (a server that is not running, a port in use, a job file that is missing or not JSON, a duplicate
or unknown job id, an unknown artifact) is one line on stderr with the server's own words and a non-zero exit,
never a traceback.
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import http.client
import json
import math
import os
import signal
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import IO
from urllib.parse import quote

from .server import DevControlPlane


class CliError(Exception):
    """One line for the user: what went wrong and what to do."""


QUEUED_HINT_SECONDS = 10.0  # `result`: how long a job may sit queued before it says so


def _call(url: str, method: str = "GET", body: object = None) -> object:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    with _open(request) as response:
        try:
            return json.load(response)
        except (TimeoutError, ValueError) as exc:
            raise CliError(f"the dev control plane did not answer usefully: {exc}") from None


def _open(request: urllib.request.Request) -> IO[bytes]:
    """The open response of a 2xx; every failure a CliError in the server's own words."""
    url = request.full_url
    try:
        return urllib.request.urlopen(request, timeout=600)
    except urllib.error.HTTPError as exc:
        try:
            said = json.loads(exc.read()).get("error") or exc.reason
        except (ValueError, AttributeError):
            said = exc.reason
        raise CliError(f"the dev control plane answered {exc.code}: {said}") from None
    except urllib.error.URLError as exc:
        raise CliError(f"cannot reach the dev control plane at {url.split('/admin')[0]} ({exc.reason}): start it with "
                       "`python -m devplane serve`, or pass its address with --url") from None
    except (OSError, ValueError, http.client.HTTPException) as exc:  # a timeout, a dropped connection
        raise CliError(f"the dev control plane did not answer usefully: {exc or type(exc).__name__}") from None


def _download(url: str, target: Path | None) -> int:
    """Stream an artifact to target (written beside it, renamed into place once whole and checked against the
    server's sha256) or to stdout; the file is opened only once the server said yes, so an unknown job or path
    leaves nothing behind."""
    with _open(urllib.request.Request(url)) as response:
        expected = response.headers.get("X-Radix-Sha256")
        if target is None:
            try:
                digest = _copy(response, sys.stdout.buffer)
                sys.stdout.flush()
            except BrokenPipeError:  # `... | head`: the reader has what it wanted
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
                return 0
            _check_digest(expected, digest)
            return 0
        partial = target.with_name(target.name + ".part")
        try:
            with open(partial, "wb") as out:
                digest = _copy(response, out)
            _check_digest(expected, digest)
            os.replace(partial, target)
        except OSError as exc:
            partial.unlink(missing_ok=True)
            raise CliError(f"cannot write {target}: {exc.strerror or exc}") from None
        except CliError:
            partial.unlink(missing_ok=True)
            raise
    return 0


def _copy(response: IO[bytes], out: IO[bytes]) -> str:
    """Copy in 1 MiB pieces (an artifact may be larger than memory); the sha256 hex of what came."""
    digest = hashlib.sha256()
    while True:
        try:
            chunk = response.read(1 << 20)
        except (OSError, http.client.HTTPException) as exc:
            raise CliError(f"the dev control plane stopped sending the artifact: {exc or type(exc).__name__}") from None
        if not chunk:
            return digest.hexdigest()
        digest.update(chunk)
        out.write(chunk)


def _check_digest(expected: str | None, digest: str) -> None:
    if expected and expected != digest:  # a body cut short reads as a short EOF, not an error: this catches it
        raise CliError(f"the artifact arrived incomplete or damaged (sha256 {digest}, the server has {expected})")


def _interrupted(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _job_file(path: Path) -> object:
    try:
        return json.loads(path.read_text())
    except OSError as exc:
        raise CliError(f"cannot read job file {path}: {exc.strerror}") from None
    except ValueError as exc:
        raise CliError(f"job file {path} is not valid JSON: {exc}") from None


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except CliError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        # `devplane jobs | head -1`: the reader left. Point stdout at devnull so the interpreter's own flush at exit
        # does not fail again (the Python docs' recipe, "Note on SIGPIPE").
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def _main(argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devplane", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the server in the foreground",
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    serve.add_argument("--port", type=int, default=8080, help="port to listen on")
    serve.add_argument("--cluster-id", default="dev-cluster", help="the one cluster id agents must use")
    serve.add_argument("--cluster-token", default="dev-cluster-token", help="the token agents must send")
    serve.add_argument("--one-time-token", action="append", default=[], help="accept this one-time token once")
    serve.add_argument("--no-long-poll", action="store_true", help="answer polls at once, unmarked (core server)")
    serve.add_argument("--core-only", action="store_true", help="also 404 the start/logs extensions")
    serve.add_argument("--verbose", action="store_true", help="log every request")
    submit = sub.add_parser("submit", help="submit job spec files; prints their job ids")
    submit.add_argument("--url", default="http://127.0.0.1:8080")
    submit.add_argument("files", nargs="+", type=Path)
    cancel = sub.add_parser("cancel", help="ask the agent to cancel a job")
    cancel.add_argument("--url", default="http://127.0.0.1:8080")
    cancel.add_argument("job_id")
    jobs = sub.add_parser("jobs", help="list the jobs it has: id, state, status")
    jobs.add_argument("--url", default="http://127.0.0.1:8080")
    result = sub.add_parser("result", help="wait for a job's result and print it")
    result.add_argument("--url", default="http://127.0.0.1:8080")
    result.add_argument("--wait", type=_seconds, default=300, help="seconds to wait for the result (default 300)")
    result.add_argument("--brief", action="store_true", help="print only the state, the result and the log")
    result.add_argument("job_id")
    artifacts = sub.add_parser("artifacts", help="list a job's artifacts: path, size, sha256 (and 'not uploaded')")
    artifacts.add_argument("--url", default="http://127.0.0.1:8080")
    artifacts.add_argument("job_id")
    artifact = sub.add_parser("artifact", help="download one stored artifact to FILE or stdout")
    artifact.add_argument("--url", default="http://127.0.0.1:8080")
    artifact.add_argument("-o", "--output", type=Path, metavar="FILE", help="write it here (default: stdout)")
    artifact.add_argument("job_id")
    artifact.add_argument("path")
    args = parser.parse_args(argv)

    if args.command == "serve":
        try:
            plane = DevControlPlane(
                args.host, args.port, cluster_id=args.cluster_id, cluster_token=args.cluster_token,
                one_time_tokens=args.one_time_token, long_poll=not (args.no_long_poll or args.core_only),
                extensions=not args.core_only, verbose=args.verbose,
            )
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise CliError(f"port {args.port} on {args.host} is in use (another dev control plane?): stop it, or "
                               "choose another with --port") from None
            raise CliError(f"cannot listen on {args.host}:{args.port}: {exc.strerror}") from None
        print(f"dev control plane on {plane.url} (cluster {args.cluster_id}); serving until Ctrl-C", flush=True)
        print(f"uploaded artifacts are kept in {plane.state.objects.dir} until it stops", flush=True)
        signal.signal(signal.SIGTERM, _interrupted)  # `kill` stops it like Ctrl-C: the artifacts' directory goes too
        # And SIGINT whatever it inherited: a shell without job control starts `serve &` with SIGINT ignored, and
        # Python then leaves it ignored (`kill -INT` did nothing there).
        signal.signal(signal.SIGINT, _interrupted)
        try:
            plane.serve_forever()
        except KeyboardInterrupt:
            pass
        finally:
            plane.state.objects.remove()  # the uploaded artifacts go with the server
        return 0
    if args.command == "submit":
        specs = [_job_file(path) for path in args.files]  # every file checked before any job is submitted
        for spec in specs:
            answer = _call(f"{args.url}/admin/jobs", "POST", spec)
            print(answer["job_id"])  # type: ignore[index]
        return 0
    if args.command == "jobs":
        print("JOB_ID\tSTATE\tSTATUS")
        for job in _call(f"{args.url}/admin/jobs")["jobs"]:  # type: ignore[index]
            status = (job.get("result") or {}).get("status", "")
            print(f"{job['job_id']}\t{_shown_state(job)}\t{status}")
        return 0
    if args.command == "cancel":
        job = _call(f"{args.url}/admin/jobs/{quote(args.job_id, safe='')}")  # an unknown id: one line, exit 1
        if job.get("result") is not None:  # type: ignore[union-attr]
            status = job["result"].get("status")  # type: ignore[index]
            raise CliError(f"job {args.job_id} already finished ({status}): nothing to cancel")
        _call(f"{args.url}/admin/jobs/{quote(args.job_id, safe='')}/cancel", "POST", {})
        print(f"cancel requested for job {args.job_id}; `result {args.job_id}` shows when it ended")
        return 0
    if args.command == "artifacts":
        listing = _call(f"{args.url}/admin/jobs/{quote(args.job_id, safe='')}/artifacts")
        for item in listing["artifacts"]:  # type: ignore[index]
            missing = "" if item["stored"] else "\tnot uploaded"  # planned, never (or not yet) stored
            print(f"{item['path']}\t{item['size_bytes']}\t{item['sha256']}{missing}")
        return 0
    if args.command == "artifact":
        job, path = quote(args.job_id, safe=""), quote(args.path, safe="/")
        return _download(f"{args.url}/admin/jobs/{job}/artifacts/{path}", args.output)
    record = _wait_for_result(args.url, args.job_id, args.wait)
    if args.brief:
        record = {"job_id": record["job_id"], "state": _shown_state(record), "result": record.get("result"),  # type: ignore[index]
                  "log": record.get("log")}  # type: ignore[union-attr]
    print(json.dumps(record, indent=2))
    if not record.get("result"):  # type: ignore[union-attr]
        print(f"devplane: no result for {args.job_id} within {args.wait:g} s (it is {record.get('state')}); "  # type: ignore[union-attr]
              "is an agent running? wait longer with --wait", file=sys.stderr)
        return 1
    return 0


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 <= value <= 86400:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds from 0 to 86400")
    return value


def _shown_state(job: dict) -> str:
    # The server keeps a started job "assigned" (what it hands out and cancels by); a person reads "running".
    return "running" if job.get("state") == "assigned" and job.get("started") else str(job.get("state"))


def _wait_for_result(url: str, job_id: str, wait: float) -> dict:
    """The job's record once it has a result, or after `wait` seconds; says early when no agent took the job."""
    job = quote(job_id, safe="")
    first = min(wait, QUEUED_HINT_SECONDS)
    record = _call(f"{url}/admin/jobs/{job}?wait={first}")
    if not record.get("result") and record.get("state") == "queued" and wait > first:  # type: ignore[union-attr]
        print(f"devplane: job {job_id} is still queued after {first:g} s: no agent has taken it (is an agent "
              "running against this server, with its cluster id and token?); waiting on", file=sys.stderr, flush=True)
    if not record.get("result") and wait > first:  # type: ignore[union-attr]
        record = _call(f"{url}/admin/jobs/{job}?wait={wait - first}")
    return record  # type: ignore[return-value]


if __name__ == "__main__":
    sys.exit(main())
