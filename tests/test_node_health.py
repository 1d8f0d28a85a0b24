"""Self-test and quarantine (cluster_agent/node_health.py), with fakes for the engine, GPUs and token."""

from __future__ import annotations

import os
import threading

import pytest

from cluster_agent.errors import EngineUnavailable, ProbeImageMissing
from cluster_agent.failure_class import classify
from cluster_agent.gpu_pool import GpuPool
from cluster_agent.models import Completion, FailureReason, GpuInfo, JobMetrics, JobStatus
from cluster_agent.node_health import NodeHealth
from cluster_agent.settings import Settings


class Engine:
    def __init__(self):
        self.fault: Exception | None = None
        self.images: list[str | None] = []

    def __call__(self, image, start=False):
        self.images.append(image)
        if self.fault:
            raise self.fault


@pytest.fixture
def parts(tmp_path):
    engine, changes, token = Engine(), [], {"rejected": False}
    node = NodeHealth(Settings(jobs_workdir=tmp_path, quarantine_after=3), engine_probe=engine, gpus=GpuPool([]),
                      token_rejected=lambda: token["rejected"], on_change=lambda: changes.append(1))
    return node, engine, changes, token


def failed(reason: FailureReason, memory_limited: bool = False) -> Completion:
    completion = Completion(tenant_id="t", status=JobStatus.FAILED, failure_reason=reason, error_message="x",
                            metrics=JobMetrics(runtime_seconds=1.0, exit_code=1 if reason is FailureReason.EXIT_CODE else None))
    return classify(completion, memory_limited=memory_limited)


def ok() -> Completion:
    return Completion(tenant_id="t", status=JobStatus.SUCCEEDED, metrics=JobMetrics(runtime_seconds=1, exit_code=0))


def test_three_infrastructure_failures_in_a_row_quarantine_and_a_passing_self_test_ends_it(parts):
    node, engine, changes, _ = parts
    for n in range(2):
        node.job_finished(f"j{n}", failed(FailureReason.AGENT_ERROR), "img:1")
    assert not node.quarantined
    node.job_finished("j2", failed(FailureReason.INTERRUPTED), "img:1")
    assert node.quarantined and changes == [1]
    report = node.report()
    assert report["state"] == "quarantined" and "3 infrastructure failures in a row" in report["reason"]
    assert "j2: interrupted" in report["reason"] and report["since"]
    checks = node.self_test()
    assert all(c.ok for c in checks) and not node.quarantined and changes == [1, 1]
    assert node.report()["state"] == "healthy"


def test_the_jobs_own_failures_never_quarantine_and_break_a_streak(parts):
    node, *_ = parts
    for n in range(10):
        node.job_finished(f"a{n}", failed(FailureReason.AGENT_ERROR), None)
        node.job_finished(f"b{n}", failed(FailureReason.EXIT_CODE), "img:1")
    node.job_finished("c", failed(FailureReason.OOM, memory_limited=True), "img:1")
    node.job_finished("d", Completion.not_run("t", FailureReason.CANCELED, "canceled"), "img:1")
    assert not node.quarantined


def test_a_failing_self_test_quarantines_with_the_failing_checks(parts, tmp_path):
    node, engine, _, token = parts
    engine.fault = EngineUnavailable("Docker engine does not answer: connection refused")
    token["rejected"] = True
    node.self_test()
    report = node.report()
    assert report["state"] == "quarantined"
    assert {c["name"] for c in report["failing_checks"]} == {"engine", "token"}
    assert "connection refused" in report["reason"]
    engine.fault, token["rejected"] = None, False
    node.self_test()
    assert not node.quarantined


def test_the_engine_check_creates_from_the_last_image_a_job_ran(parts):
    node, engine, *_ = parts
    node.self_test()
    node.job_finished("j", ok(), "python:3.11-slim")
    node.self_test()
    assert engine.images == [None, "python:3.11-slim"]


def test_an_unwritable_jobs_directory_fails_the_self_test(tmp_path):
    jobs = tmp_path / "jobs"  # missing: nothing can be written there
    node = NodeHealth(Settings(jobs_workdir=jobs), engine_probe=Engine(), gpus=GpuPool([]), token_rejected=lambda: False)
    node.self_test()
    assert node.report()["failing_checks"][0]["name"] == "jobs_dir"


def test_a_gpu_whose_device_node_is_gone_fails_the_self_test(tmp_path):
    ghost = GpuInfo(index=97, uuid="GPU-ghost", name="fake", memory_total_mb=1)
    assert not os.path.exists("/dev/nvidia97")
    node = NodeHealth(Settings(jobs_workdir=tmp_path), engine_probe=Engine(), gpus=GpuPool([ghost]),
                      token_rejected=lambda: False)
    node.self_test()
    (check,) = node.report()["failing_checks"]
    assert check["name"] == "gpus" and "/dev/nvidia97" in check["detail"]


def test_the_operator_clears_a_quarantine(parts):
    node, *_ = parts
    for n in range(3):
        node.job_finished(f"j{n}", failed(FailureReason.AGENT_ERROR), None)
    assert node.quarantined
    node.clear("the operator (SIGUSR1)")
    assert not node.quarantined and node.report()["infrastructure_failures_in_a_row"] == 0


def test_quarantine_after_zero_never_quarantines_on_failures(tmp_path):
    node = NodeHealth(Settings(jobs_workdir=tmp_path, quarantine_after=0), engine_probe=Engine(), gpus=GpuPool([]),
                      token_rejected=lambda: False)
    for n in range(5):
        node.job_finished(f"j{n}", failed(FailureReason.AGENT_ERROR), None)
    assert not node.quarantined


def _two_gpus():
    return [GpuInfo(index=0, uuid="GPU-good", name="fake", memory_total_mb=1),
            GpuInfo(index=1, uuid="GPU-bad", name="fake", memory_total_mb=1)]


def test_a_gpu_a_container_does_not_see_is_held_out_alone_and_returns_when_it_passes(tmp_path, monkeypatch):
    monkeypatch.setattr("cluster_agent.node_health.device_present", lambda path: True)
    pool = GpuPool(_two_gpus())
    verdict = {"GPU-bad": "a container given it through the cdi injection has no /dev/nvidia1"}
    seen = []

    def probe(image, gpus):
        seen.append((image, [g.uuid for g in gpus]))
        return {u: why for u, why in verdict.items() if u in [g.uuid for g in gpus]}

    node = NodeHealth(Settings(jobs_workdir=tmp_path), probe_image="job-image:1", engine_probe=Engine(),
                      gpus=pool, token_rejected=lambda: False, gpu_probe=probe,
                     )
    checks = {c.name: c for c in node.self_test()}
    assert seen == [("job-image:1", ["GPU-good"]), ("job-image:1", ["GPU-bad"])]  # one GPU a container
    assert checks["gpus"].ok and "GPU-bad" in checks["gpus"].detail
    assert not node.quarantined  # one bad GPU takes itself out, not the node
    assert node.report()["gpus_held_out"] == verdict
    assert pool.free_count() == 1 and pool.held() == verdict
    assert [g.uuid for g in pool.acquire("j1", 1, threading.Event())] == ["GPU-good"]
    pool.release("j1")
    with pytest.raises(TimeoutError):  # the held-out GPU is never given: a job asking for two waits
        _acquire_within(pool, "j2", 2, 0.3)

    verdict.clear()  # fixed (a runtime restarted, a spec regenerated): the next self-test returns it
    node.self_test()
    assert pool.held() == {} and pool.free_count() == 2 and node.report()["gpus_held_out"] == {}


def test_every_gpu_failing_in_a_container_quarantines_the_node(tmp_path, monkeypatch):
    monkeypatch.setattr("cluster_agent.node_health.device_present", lambda path: True)
    pool = GpuPool(_two_gpus())
    node = NodeHealth(Settings(jobs_workdir=tmp_path), probe_image="job-image:1", engine_probe=Engine(),
                      gpus=pool, token_rejected=lambda: False,
                      gpu_probe=lambda image, gpus: {g.uuid: "did not start: nvidia-container-cli: initialization error"
                                                     for g in gpus},
                     )
    node.self_test()
    assert node.quarantined
    (check,) = node.report()["failing_checks"]
    assert check["name"] == "gpus" and "GPU-good" in check["detail"] and "nvidia-container-cli" in check["detail"]


def test_a_gpu_probe_that_raises_holds_nothing_out(tmp_path, monkeypatch):
    monkeypatch.setattr("cluster_agent.node_health.device_present", lambda path: True)
    pool = GpuPool(_two_gpus())

    def probe(image, gpus):
        raise EngineUnavailable("Docker engine does not answer")

    node = NodeHealth(Settings(jobs_workdir=tmp_path), engine_probe=Engine(), gpus=pool,
                      token_rejected=lambda: False, gpu_probe=probe)
    checks = {c.name: c for c in node.self_test()}
    assert checks["gpus"].ok and pool.free_count() == 2  # the engine check speaks for an engine that is down


def test_a_gpu_held_out_stays_out_while_the_engine_cannot_look_again(tmp_path, monkeypatch):
    monkeypatch.setattr("cluster_agent.node_health.device_present", lambda path: True)
    pool = GpuPool(_two_gpus())
    answer = {"value": {"GPU-bad": "has no /dev/nvidia1"}}

    def probe(image, gpus):
        if isinstance(answer["value"], Exception):
            raise answer["value"]
        return answer["value"]

    node = NodeHealth(Settings(jobs_workdir=tmp_path), probe_image="i:1", engine_probe=Engine(),
                      gpus=pool, token_rejected=lambda: False, gpu_probe=probe,
                     )
    node.self_test()
    answer["value"] = EngineUnavailable("Docker engine does not answer")
    node.self_test()
    assert list(pool.held()) == ["GPU-bad"]  # not looked at is not passed


def _acquire_within(pool, job_id, count, seconds):
    cancel = threading.Event()
    timer = threading.Timer(seconds, cancel.set)
    timer.start()
    try:
        if pool.acquire(job_id, count, cancel) is None:
            raise TimeoutError
    finally:
        timer.cancel()


def test_a_jobs_image_never_runs_in_the_gpu_check_and_a_gpu_a_job_holds_is_not_looked_at(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr("cluster_agent.node_health.device_present", lambda path: True)
    pool = GpuPool(_two_gpus())
    seen = []
    probe = lambda image, gpus: seen.append((image, [g.uuid for g in gpus])) or {}  # noqa: E731
    untrusted = NodeHealth(Settings(jobs_workdir=tmp_path), engine_probe=Engine(), gpus=pool,
                           token_rejected=lambda: False, gpu_probe=probe)
    untrusted.job_finished("j", ok(), "hostile/image:1")
    with caplog.at_level("WARNING"):
        untrusted.self_test()
    assert seen == []  # the last job's image is the job's: never started by the agent
    assert "--self-test-image" in caplog.text

    trusted = NodeHealth(Settings(jobs_workdir=tmp_path), probe_image="busybox:trusted", engine_probe=Engine(),
                         gpus=pool, token_rejected=lambda: False, gpu_probe=probe)
    pool.acquire("tenant-job", 1, threading.Event())  # GPU-good
    trusted.self_test()
    assert seen == [("busybox:trusted", ["GPU-bad"])]  # the job's GPU is not lent to the self-test
    assert pool.owner("GPU-good") == "tenant-job" and pool.owner("GPU-bad") is None  # lent and given back


def test_a_long_reason_is_cut(tmp_path, monkeypatch):
    monkeypatch.setattr("cluster_agent.node_health.device_present", lambda path: True)
    pool = GpuPool(_two_gpus())
    node = NodeHealth(Settings(jobs_workdir=tmp_path), probe_image="i:1", engine_probe=Engine(), gpus=pool,
                      token_rejected=lambda: False, gpu_probe=lambda image, gpus: {g.uuid: "x" * 10**6 for g in gpus})
    node.self_test()
    report = node.report()
    assert all(len(why) <= 300 for why in report["gpus_held_out"].values())
    assert len(report["reason"]) < 3000


def test_the_last_jobs_image_removed_is_forgotten_not_a_quarantine(parts):
    """Pruned or removed by hand: a quarantined node runs no job to name another image, so failing on it would
    quarantine the node for good (and SIGUSR1 would only clear it until the next self-test)."""
    node, engine, *_ = parts
    node.job_finished("j", ok(), "gone/image:1")

    def probe(image, start=False):
        engine.images.append(image)
        if image == "gone/image:1":
            raise ProbeImageMissing("the self-test image gone/image:1 is not on this host")

    node._engine_probe = probe
    checks = {c.name: c for c in node.self_test()}
    assert checks["engine"].ok and not node.quarantined
    assert engine.images == ["gone/image:1", None]  # then the engine's answer alone
    node.self_test()
    assert engine.images[-1] is None


def test_a_trusted_self_test_image_missing_fails_the_engine_check(tmp_path):
    def probe(image, start=False):
        raise ProbeImageMissing(f"the self-test image {image} is not on this host: load or pull it there")

    node = NodeHealth(Settings(jobs_workdir=tmp_path), probe_image="trusted:1", engine_probe=probe, gpus=GpuPool([]),
                      token_rejected=lambda: False)
    checks = {c.name: c for c in node.self_test()}
    assert not checks["engine"].ok and "trusted:1 is not on this host" in checks["engine"].detail and node.quarantined


def test_a_job_named_like_the_self_test_keeps_its_gpus(tmp_path, monkeypatch):
    monkeypatch.setattr("cluster_agent.node_health.device_present", lambda path: True)
    pool = GpuPool(_two_gpus())
    node = NodeHealth(Settings(jobs_workdir=tmp_path), probe_image="busybox:trusted", engine_probe=Engine(),
                      gpus=pool, token_rejected=lambda: False, gpu_probe=lambda image, gpus: {})
    [held] = pool.acquire("self-test", 1, threading.Event())  # a valid job id
    node.self_test()  # lends the other GPU and gives it back
    assert pool.owner(held.uuid) == "self-test"
    with pytest.raises(TimeoutError):  # never handed to a second job
        _acquire_within(pool, "other-job", 2, 0.3)


def _running(node: NodeHealth) -> list[float]:
    """When each self-test ran (monotonic seconds)."""
    import time

    runs: list[float] = []
    real = node.self_test

    def counted():
        runs.append(time.monotonic())
        return real()

    node.self_test = counted  # type: ignore[method-assign]
    return runs


def test_sigusr1_runs_the_self_test_even_with_the_interval_at_zero(tmp_path):
    engine = Engine()
    node = NodeHealth(Settings(jobs_workdir=tmp_path, self_test_interval=0, quarantine_after=1), engine_probe=engine,
                      gpus=GpuPool([]), token_rejected=lambda: False)
    runs = _running(node)
    node.start()
    try:
        engine.fault = EngineUnavailable("Docker engine does not answer")
        node.clear("the operator (SIGUSR1)")
        _eventually(lambda: len(runs) == 1)
        assert node.quarantined  # the engine is still broken: the test the operator asked for said so
    finally:
        node.stop()


def test_a_failed_self_test_the_operator_asked_for_retries_after_the_first_backoff(tmp_path, monkeypatch):
    monkeypatch.setattr("cluster_agent.node_health.BACKOFF_FIRST_SECONDS", 0.3)
    monkeypatch.setattr("cluster_agent.node_health.BACKOFF_MAX_SECONDS", 5.0)
    engine = Engine()
    engine.fault = EngineUnavailable("Docker engine does not answer")
    node = NodeHealth(Settings(jobs_workdir=tmp_path, self_test_interval=0), engine_probe=engine, gpus=GpuPool([]),
                      token_rejected=lambda: False)
    runs = _running(node)
    node.start()
    try:
        node.clear("the operator (SIGUSR1)")
        _eventually(lambda: len(runs) == 2)
        assert runs[1] - runs[0] < 0.5  # 0.3 s later, not 0.6 s: the backoff started again
    finally:
        node.stop()


def _eventually(condition, timeout: float = 5.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)
