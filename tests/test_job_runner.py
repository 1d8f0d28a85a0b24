"""The job runner with a fake executor: GPU pinning, waiting, invalid requests, stop before start."""

import threading
import time

import pytest

from cluster_agent.executors import ContainerSpec, ExitInfo
from cluster_agent.gpu_pool import GpuPool
from cluster_agent.job_runner import JobRun
from cluster_agent.received_job import ReceivedJob
from cluster_agent.models import FailureReason, GpuInfo, JobStatus
from cluster_agent.settings import Settings


class FakeExecutor:
    """Records container specs; each container 'runs' until released (or for `run_seconds`)."""

    jobs_die_with_engine = True
    engine_name = "the fake engine"
    max_nodes = 1

    def __init__(self, run_seconds=0.0):
        self.specs: list[ContainerSpec] = []
        self.run_seconds = run_seconds
        self.running: set[str] = set()
        self.max_running = 0
        self._lock = threading.Lock()

    def ping(self):
        pass

    def prepare_image(self, image, policy="if-not-present", auth=None):
        pass

    def start(self, spec):
        with self._lock:
            self.specs.append(spec)
            cid = f"c{len(self.specs)}"
            self.running.add(cid)
            self.max_running = max(self.max_running, len(self.running))
        return cid

    def wait_started(self, cid, stop):
        return time.time()

    def stream_output(self, cid, on_stdout, on_stderr):
        on_stdout(b"{}")

    def wait(self, cid, timeout):
        time.sleep(self.run_seconds)
        with self._lock:
            self.running.discard(cid)
        return True

    def stop(self, cid, grace):
        pass

    def exit_info(self, cid):
        return ExitInfo(exit_code=0, oom_killed=False)

    def remove(self, cid):
        pass


GPUS = [GpuInfo(index=i, uuid=f"GPU-{i}", name="fake H100", memory_total_mb=81559) for i in range(2)]


@pytest.fixture
def settings(tmp_path):
    return Settings(jobs_workdir=tmp_path, cluster_id="c1", max_concurrent_jobs=2)


def run(settings, executor, pool, **job):
    job = {"job_id": "j1", "image": "img:1", **job}
    return JobRun(ReceivedJob.parse(job), settings=settings, executor=executor, gpu_pool=pool).execute()


def test_job_gets_exactly_its_gpus_pinned_by_uuid(settings):
    executor = FakeExecutor()
    completion = run(settings, executor, GpuPool(GPUS), resources={"gpus": 1})
    spec = executor.specs[0]
    assert [g.uuid for g in spec.gpus] == ["GPU-0"]
    assert spec.env["NVIDIA_VISIBLE_DEVICES"] == "GPU-0"
    assert spec.labels["radix.gpu_ids"] == "GPU-0"
    assert completion.metrics.gpu_ids == ["GPU-0"]


def test_job_env_cannot_override_the_pinning(settings):
    executor = FakeExecutor()
    run(settings, executor, GpuPool(GPUS), orchestration={"num_gpus": 2}, env={"NVIDIA_VISIBLE_DEVICES": "all"})
    assert executor.specs[0].env["NVIDIA_VISIBLE_DEVICES"] == "GPU-0,GPU-1"


def test_gpu_less_job_on_a_gpu_host_sees_no_gpu(settings):
    executor = FakeExecutor()
    run(settings, executor, GpuPool(GPUS))
    assert executor.specs[0].gpus == []
    assert executor.specs[0].env["NVIDIA_VISIBLE_DEVICES"] == "void"


def test_one_job_at_a_time_gets_every_gpu_when_it_names_no_count(tmp_path):
    executor = FakeExecutor()
    run(Settings(jobs_workdir=tmp_path, max_concurrent_jobs=1), executor, GpuPool(GPUS))
    assert [g.uuid for g in executor.specs[0].gpus] == ["GPU-0", "GPU-1"]


def test_more_gpus_than_the_host_has_is_invalid_at_once(settings):
    executor = FakeExecutor()
    completion = run(settings, executor, GpuPool(GPUS), resources={"gpus": 3})
    assert completion.status is JobStatus.FAILED
    assert completion.failure_reason is FailureReason.INVALID_JOB
    assert "asks for 3 GPU(s) but this host has 2" in completion.error_message
    assert executor.specs == []


def test_gpu_jobs_wait_for_each_other_and_never_share(settings):
    executor = FakeExecutor(run_seconds=0.3)
    pool = GpuPool(GPUS)
    results = {}

    def go(job_id):
        results[job_id] = JobRun(
            ReceivedJob.parse({"job_id": job_id, "image": "img:1", "resources": {"gpus": 2}}), settings=settings, executor=executor, gpu_pool=pool
        ).execute()

    threads = [threading.Thread(target=go, args=(f"j{i}",)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert all(r.status is JobStatus.SUCCEEDED for r in results.values())
    assert executor.max_running == 1  # each wanted both GPUs: they ran one after another
    assert pool.free_count() == 2


def test_stop_while_waiting_for_gpus_completes_without_running(settings):
    executor = FakeExecutor()
    pool = GpuPool(GPUS)
    pool.acquire("other", 2, threading.Event())
    job = JobRun(ReceivedJob.parse({"job_id": "j1", "image": "img:1", "resources": {"gpus": 1}}), settings=settings, executor=executor, gpu_pool=pool)
    results = []
    waiter = threading.Thread(target=lambda: results.append(job.execute()))
    waiter.start()
    time.sleep(0.2)
    job.stop(FailureReason.CANCELED, "canceled by the control plane")
    waiter.join(5)
    assert results[0].status is JobStatus.CANCELED
    assert results[0].failure_reason is FailureReason.CANCELED
    assert executor.specs == []


def test_start_timing_splits_the_engine_from_the_agents_own_share(settings):
    """radix_agent_dispatch_overhead_seconds is fed from this: the engine's create+start must not count as ours."""

    class SlowEngine(FakeExecutor):
        def start(self, spec):
            time.sleep(0.3)
            return super().start(spec)

    job = JobRun(ReceivedJob.parse({"job_id": "j1", "image": "img:1"}), settings=settings, executor=SlowEngine(), gpu_pool=GpuPool([]))
    assert job.execute().status is JobStatus.SUCCEEDED
    engine, own = job.start_timing
    assert engine >= 0.3
    assert 0 <= own < 0.25


def test_a_registry_password_echoed_into_an_error_never_reaches_the_result(settings):
    from cluster_agent.errors import JobFailed

    password = "pw-\"quoted\"/s3cret"

    class EchoingRegistry(FakeExecutor):
        def prepare_image(self, image, policy="if-not-present", auth=None):
            raise JobFailed(FailureReason.IMAGE_UNAVAILABLE, f"cannot pull: registry said bad password {auth and password!r}")

    job = JobRun(
        ReceivedJob.parse({"job_id": "j1", "image": "reg.example.com/x:1",
                           "registry_auth": {"username": "u", "password": password}}),
        settings=settings, executor=EchoingRegistry(), gpu_pool=GpuPool([]),
    )
    completion = job.execute()
    assert completion.failure_reason is FailureReason.IMAGE_UNAVAILABLE
    assert "s3cret" not in completion.error_message and "[REDACTED]" in completion.error_message


def test_a_job_the_client_could_read_only_in_part_is_invalid(settings):
    completion = JobRun(
        ReceivedJob.parse({"job_id": "deep", "image": "img:1", "x-radix-refused": "the job nests deeper than 200 levels"}),
        settings=settings, executor=FakeExecutor(), gpu_pool=GpuPool([]),
    ).execute()
    assert completion.failure_reason is FailureReason.INVALID_JOB and "200 levels" in completion.error_message


def test_an_output_nested_past_what_a_result_can_carry_is_invalid_output(settings, tmp_path):
    class DeepStdout(FakeExecutor):
        def stream_output(self, cid, on_stdout, on_stderr):
            on_stdout(b"[" * 300 + b"]" * 300)

    completion = JobRun(ReceivedJob.parse({"job_id": "j1", "image": "img:1"}), settings=settings, executor=DeepStdout(),
                        gpu_pool=GpuPool([])).execute()
    assert completion.status is JobStatus.SUCCEEDED  # stdout that cannot be a document is wrapped
    assert completion.output_payload["stdout"].startswith("[[[")
    completion.to_wire()


def test_a_cancel_never_waits_for_the_pull_of_an_image_gone_since_its_check(settings):
    """The image went away between its check and the create: it is pulled again outside the stop lock."""
    from cluster_agent.errors import ImageGone

    pulling = threading.Event()
    release_pull = threading.Event()

    class GoneImage(FakeExecutor):
        def __init__(self):
            super().__init__()
            self.prepares = 0

        def prepare_image(self, image, policy="if-not-present", auth=None):
            self.prepares += 1
            if self.prepares == 2:  # the re-pull: a registry that takes its time
                pulling.set()
                release_pull.wait(30)

        def start(self, spec):
            if self.prepares < 2:
                raise ImageGone(FailureReason.IMAGE_UNAVAILABLE, "image img:1: No such image")
            return super().start(spec)

    executor = GoneImage()
    job = JobRun(ReceivedJob.parse({"job_id": "j1", "image": "img:1"}), settings=settings, executor=executor,
                 gpu_pool=GpuPool([]))
    results = []
    runner = threading.Thread(target=lambda: results.append(job.execute()))
    runner.start()
    assert pulling.wait(10)
    stopper = threading.Thread(target=job.stop, args=(FailureReason.CANCELED, "canceled by the control plane"))
    stopper.start()
    stopper.join(5)
    assert not stopper.is_alive()  # the stop did not wait for the pull
    release_pull.set()
    runner.join(10)
    assert results[0].status is JobStatus.CANCELED and executor.specs == []


def test_an_image_gone_twice_is_image_unavailable(settings):
    from cluster_agent.errors import ImageGone

    class AlwaysGone(FakeExecutor):
        def start(self, spec):
            raise ImageGone(FailureReason.IMAGE_UNAVAILABLE, "image img:1: No such image")

    completion = JobRun(ReceivedJob.parse({"job_id": "j1", "image": "img:1"}), settings=settings,
                        executor=AlwaysGone(), gpu_pool=GpuPool([])).execute()
    assert completion.failure_reason is FailureReason.IMAGE_UNAVAILABLE and "No such image" in completion.error_message


def test_a_gpu_that_faults_while_the_job_runs_fails_it_as_gpu_error_and_takes_no_new_job(settings):
    pool = GpuPool(GPUS)

    class FaultingEngine(FakeExecutor):
        def wait(self, cid, timeout):
            pool.set_unhealthy(GPUS[0].uuid, ["critical XID 79 (fallen off the bus)"])
            return super().wait(cid, timeout)

    completion = run(settings, FaultingEngine(), pool, resources={"gpus": 1})
    assert completion.status is JobStatus.FAILED and completion.failure_reason is FailureReason.GPU_ERROR
    assert "GPU-0" in completion.error_message and "XID 79" in completion.error_message
    assert completion.metrics.failure_class == "infrastructure" and completion.metrics.retryable is True
    assert pool.free_count() == 1  # GPU-0 is out until healthy
    pool.set_unhealthy(GPUS[0].uuid, [])
    assert pool.free_count() == 2


def test_a_gpu_unhealthy_before_the_job_is_not_its_fault(settings):
    pool = GpuPool(GPUS)
    pool.set_unhealthy(GPUS[1].uuid, ["temperature 95 C over 90"])
    completion = run(settings, FakeExecutor(), pool, resources={"gpus": 1})  # gets GPU-0, the healthy one
    assert completion.status is JobStatus.SUCCEEDED


def test_docker_mode_refuses_a_multi_node_job_before_it_touches_the_engine(settings):
    executor = FakeExecutor()
    completion = run(settings, executor, GpuPool(GPUS), orchestration={"nodes": 2})
    assert completion.status is JobStatus.FAILED and completion.failure_reason is FailureReason.INVALID_JOB
    assert "asks for 2 nodes" in completion.error_message and "--execution-mode slurm" in completion.error_message
    assert executor.specs == []  # no container was made
    assert run(settings, FakeExecutor(), GpuPool(GPUS), orchestration={"nodes": 1}).status is JobStatus.SUCCEEDED


def test_a_misspelled_resources_or_orchestration_field_is_named_in_the_log(settings, caplog):
    with caplog.at_level("INFO", logger="cluster_agent.job_runner"):
        completion = run(settings, FakeExecutor(), GpuPool(GPUS), resources={"mig_profile": "1g.10gb", "gpu": 1},
                         orchestration={"node": 2, "vendor_thing": 1})
    assert completion.status is JobStatus.SUCCEEDED
    text = caplog.text
    assert "'resources.mig_profile' is not a field this agent knows: ignored (did you mean resources.gpu_profile?)" in text
    assert "did you mean resources.gpus?" in text and "did you mean orchestration.nodes?" in text
    assert "'orchestration.vendor_thing' is not a field this agent knows: ignored" in text


def test_a_result_that_cannot_be_redacted_keeps_its_verdict_and_withholds_its_output(monkeypatch):
    from cluster_agent.job_runner import JobRun
    from cluster_agent.models import Completion, JobMetrics, JobStatus

    run = JobRun.__new__(JobRun)
    run.job_id = "j1"
    done = Completion(tenant_id="t", status=JobStatus.SUCCEEDED, output_payload={"secret": "x"},
                      metrics=JobMetrics(runtime_seconds=2.5, exit_code=0))
    monkeypatch.setattr(run, "_execute", lambda: done, raising=False)
    monkeypatch.setattr(run, "_without_job_secrets", lambda c: (_ for _ in ()).throw(OverflowError("x")), raising=False)
    run.job = type("J", (), {"spec": None})()
    run._retryable = None
    result = run._judged()
    assert result.status is JobStatus.SUCCEEDED and result.output_payload == {}
    assert result.metrics.exit_code == 0 and result.metrics.runtime_seconds == 2.5
    assert "could not redact" in result.error_message and "OverflowError" in result.error_message
