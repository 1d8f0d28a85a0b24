"""The dev control plane never hands a job to a poll whose agent is gone (killed mid long poll)."""

import json
import socket
import time

from devplane import DevControlPlane


def test_a_job_is_not_lost_to_a_poll_whose_agent_died():
    plane = DevControlPlane(cluster_id="c", cluster_token="t").start()
    try:
        host, port = plane.url.split("//")[1].split(":")
        body = json.dumps({"max_jobs": 1, "wait_seconds": 20}).encode()
        conn = socket.create_connection((host, int(port)))
        conn.sendall(b"POST /v1/clusters/c/jobs/poll HTTP/1.1\r\nHost: x\r\nX-Radix-Cluster-Token: t\r\n"
                     b"X-Radix-Tenant-Id: d\r\nContent-Type: application/json\r\n"
                     + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        time.sleep(0.5)
        conn.close()  # the agent is killed while its long poll is held
        time.sleep(0.3)
        job_id = plane.state.submit({"image": "x", "command": ["true"]})
        time.sleep(1.5)
        assert plane.state.jobs[job_id].state == "queued"  # waiting for a live agent, not "assigned" to a dead one
    finally:
        plane.stop()
