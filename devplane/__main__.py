"""`python -m devplane serve|submit|result`: the development control plane and a tiny client for it."""

from __future__ import annotations

import argparse
import json
import sys
import urllib.request
from pathlib import Path

from .server import DevControlPlane


def _call(url: str, method: str = "GET", body: object = None) -> object:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=600) as response:
        return json.load(response)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devplane", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the server in the foreground")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8080)
    serve.add_argument("--cluster-id", default="dev-cluster")
    serve.add_argument("--cluster-token", default="dev-cluster-token")
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
    result = sub.add_parser("result", help="wait for a job's result and print it")
    result.add_argument("--url", default="http://127.0.0.1:8080")
    result.add_argument("--wait", type=float, default=300)
    result.add_argument("job_id")
    args = parser.parse_args(argv)

    if args.command == "serve":
        plane = DevControlPlane(
            args.host, args.port, cluster_id=args.cluster_id, cluster_token=args.cluster_token,
            one_time_tokens=args.one_time_token, long_poll=not (args.no_long_poll or args.core_only),
            extensions=not args.core_only, verbose=args.verbose,
        )
        print(f"dev control plane on {plane.url} (cluster {args.cluster_id})", flush=True)
        try:
            plane.serve_forever()
        except KeyboardInterrupt:
            pass
        return 0
    if args.command == "submit":
        for path in args.files:
            answer = _call(f"{args.url}/admin/jobs", "POST", json.loads(path.read_text()))
            print(answer["job_id"])  # type: ignore[index]
        return 0
    if args.command == "cancel":
        _call(f"{args.url}/admin/jobs/{args.job_id}/cancel", "POST", {})
        return 0
    record = _call(f"{args.url}/admin/jobs/{args.job_id}?wait={args.wait}")
    print(json.dumps(record, indent=2))
    return 0 if record.get("result") else 1  # type: ignore[union-attr]


if __name__ == "__main__":
    sys.exit(main())
