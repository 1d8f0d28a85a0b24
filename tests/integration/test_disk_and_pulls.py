"""Disk hygiene and image pulls that stall, on the real engine."""

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import docker

from cluster_agent.disk import DiskGuard
from devplane.images import ensure_busybox_image
from tests.integration.conftest import eventually


def test_low_disk_takes_no_jobs_and_says_so_in_the_heartbeat(cp, start_agent):
    agent = start_agent("--min-free-disk-gb", "1000000", "--heartbeat-interval", "1")
    job_id = cp.submit(command=["true"])
    time.sleep(3)
    assert cp.result_now(job_id)["state"] == "queued"
    assert "low disk" in agent.log and "--min-free-disk-gb" in agent.log
    disk = eventually(lambda: cp.heartbeats()[-1]["capabilities"].get("disk"), what="disk in heartbeat")
    assert disk["low"] is True and disk["jobs_workdir_free_gb"] > 0
    assert all(p["max_jobs"] == 0 for p in cp.stats()["last_polls"])


def test_prune_removes_only_unused_images_jobs_used(docker_client, busybox, tmp_path, cluster_id):
    marker = tmp_path / "marker"
    names = {}
    for name in ("a", "b"):
        marker.write_text(name)
        names[name] = ensure_busybox_image(docker_client, f"radix-test/prune-{name}:latest", {"marker": str(marker)})
    bystander = busybox  # never used by a job of this guard: must survive
    kept = docker_client.containers.create(names["b"], ["true"], labels={"radix.cluster_id": cluster_id})
    try:
        guard = DiskGuard(tmp_path, None, min_free_gb=0, prune_to_free_gb=0, engine_api=docker_client.api)
        guard.image_used(names["a"])
        guard.image_used(names["b"])
        removed = guard.prune(target_free_gb=10**9)  # more than any disk: prune all it may
        assert removed == [names["a"]]
        try:
            docker_client.images.get(names["a"])
            raise AssertionError("prune-a should be gone")
        except docker.errors.ImageNotFound:
            pass
        assert docker_client.images.get(names["b"])  # a container uses it
        assert docker_client.images.get(bystander)
    finally:
        kept.remove(force=True)
        for name in names.values():
            try:
                docker_client.images.remove(name, force=True)
            except docker.errors.ImageNotFound:
                pass


class _StallingRegistry(BaseHTTPRequestHandler):
    """Answers the registry ping, then never answers the manifest request."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_GET(self):  # noqa: N802
        if self.path == "/v2/":
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.send_header("Docker-Distribution-API-Version", "registry/2.0")
            self.end_headers()
            self.wfile.write(b"{}")
            return
        self.server.stalled.wait(60)

    do_HEAD = do_GET


def test_a_stalled_pull_fails_after_the_stall_limit(cp, start_agent):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _StallingRegistry)
    server.daemon_threads = True
    server.stalled = threading.Event()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        # 127.0.0.0/8 is an insecure registry for the engine by default: plain HTTP is used.
        image = f"127.0.0.1:{server.server_address[1]}/stuck/image:1"
        agent = start_agent("--pull-stall-seconds", "3")
        started = time.monotonic()
        result = cp.run(image=image, command=["true"], wait=90)
        assert result["failure_reason"] == "image_unavailable"
        assert "made no progress for 3 s" in result["error_message"], result["error_message"]
        assert time.monotonic() - started < 30
        assert agent.proc.poll() is None
    finally:
        server.stalled.set()
        server.shutdown()
