#!/usr/bin/env python3
"""Where does the agent's own time go? py-spy samples the agent while it takes N jobs one at a time (as
bench/run.py section 2 does), then prints the functions that held the most samples on one path:

  --path dispatch  from the poll answer to the running container and the start call (non-idle samples)
  --path finish    from the container's exit to the complete request (idle samples included: on this path a
                   wait is dead time, which is what is looked for)

Usage: bench/profile_dispatch.py [--path dispatch|finish] [--jobs N] [--rate HZ] [--out FILE]
(needs py-spy and ptrace rights, i.e. root)
Beside the profile it prints the same latency figures as make bench, so a change can be measured before and after.
"""

from __future__ import annotations

import argparse
import collections
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from run import BUSYBOX_IMAGE, TOKEN, Agent, engine_create_start, free_port, pct, read_dispatch_metrics, wait_results  # noqa: E402

import docker  # noqa: E402

from devplane import DevControlPlane  # noqa: E402
from devplane.images import ensure_busybox_image  # noqa: E402


def on_path(path: str, names: list[str]) -> bool:
    if path == "dispatch":
        # The job thread from the poll answer to the running container, and the start call's thread.
        return ("JobRun._run" in names or "LiveJob._send_start" in names) and "JobRun._watch" not in names
    # The job thread once its container exited: judging, spooling, the last log chunk, the complete request.
    # (Waiting for the container itself is the job's time, not the agent's.)
    if "ContainerWatch._wait_until_done" in names:
        return False
    return any(n in names for n in ("ContainerWatch.watch", "judge", "Agent._record_finished", "Agent._deliver"))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--path", choices=("dispatch", "finish"), default="dispatch")
    parser.add_argument("--jobs", type=int, default=40)
    parser.add_argument("--rate", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=Path("/tmp/radix-dispatch.pyspy"))
    parser.add_argument("--no-profile", action="store_true", help="only the latency figures (py-spy slows the agent)")
    args = parser.parse_args()
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))

    client = docker.from_env()
    ensure_busybox_image(client)
    plane = DevControlPlane(cluster_id="bench", cluster_token=TOKEN).start()
    metrics_port = free_port()
    agent = Agent(plane, "--metrics-port", str(metrics_port))
    spy = None if args.no_profile else subprocess.Popen([py_spy, "record", "--pid", str(agent.proc.pid), "--rate", str(args.rate), "--threads",
                            "--format", "raw", "--output", str(args.out), "--nonblocking",
                            *(["--idle"] if args.path == "finish" else [])],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1.5)
    pickup, to_start = [], []
    for _ in range(args.jobs):
        time.sleep(0.2)
        submitted = time.time()
        command = ["true"] if args.path == "dispatch" else ["sh", "-c", "echo '{\"n\":1}'"]
        record = wait_results(plane, [plane.state.submit({"image": BUSYBOX_IMAGE, "command": command})])[0]
        pickup.append(record.assigned_at - submitted)
        to_start.append(record.started["at"] - submitted)
    metric_means = {k: f"{1000 * v['mean']:.2f} ms" for k, v in read_dispatch_metrics(metrics_port).items()}
    if spy is not None:
        spy.send_signal(signal.SIGINT)
        spy.wait(30)
    agent.stop()
    plane.stop()

    engine = [engine_create_start(client, agent.dir) for _ in range(args.jobs)]
    own = [s - p - statistics.median(engine) for s, p in zip(to_start, pickup)]
    print(f"pickup p50 {pct(pickup, 50) * 1000:.1f} ms; submitted -> start call p50 {pct(to_start, 50) * 1000:.1f} ms; "
          f"engine create+start p50 {pct(engine, 50) * 1000:.1f} ms; agent's own share p50 {pct(own, 50) * 1000:.1f} ms")
    print(f"the agent's own timing (/metrics, mean): {metric_means}")
    if spy is None:
        return 0

    # Raw format: "thread;frame;...;frame count", a frame is "function (file:line)". Only the chosen path counts.
    inclusive: collections.Counter[str] = collections.Counter()
    leaves: collections.Counter[str] = collections.Counter()
    total = 0
    for line in args.out.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        names = [f.split(" (")[0] for f in frames]
        if not on_path(args.path, names):
            continue
        total += int(count)
        for frame in {f.rsplit(":", 1)[0] + ")" if " (" in f else f for f in frames[1:]}:
            inclusive[frame] += int(count)
        leaves[frames[-1]] += int(count)
    per_job = 1000 / args.rate / args.jobs
    print(f"{args.path} path: {total} samples at {args.rate} Hz = {total * per_job:.1f} ms per job; by inclusive time:")
    for frame, count in inclusive.most_common(25):
        print(f"  {count * per_job:6.2f} ms  {frame}")
    print("hottest lines:")
    for frame, count in leaves.most_common(10):
        print(f"  {count * per_job:6.2f} ms  {frame}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
