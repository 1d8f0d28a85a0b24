"""verdict.judge on the exits that differ between engines' init processes."""

from cluster_agent.models import JobMetrics, JobSpec
from cluster_agent.output import OutputCollector
from cluster_agent.verdict import Ending, judge


def _judge(tmp_path, exit_code, stderr, command=("/no/such/program",)):
    collected = OutputCollector(1 << 20)
    collected.feed_stderr(stderr)
    metrics = JobMetrics(runtime_seconds=0.1, exit_code=exit_code)
    spec = JobSpec(job_id="j1", image="busybox", command=list(command))
    return judge("t", spec, Ending(exit_code=exit_code), tmp_path, collected, metrics, 1 << 20)


def test_catatonit_failing_to_exec_the_command_is_exit_127_naming_the_program(tmp_path):
    result = _judge(tmp_path, 1, b"ERROR (catatonit:6): failed to exec pid1: No such file or directory\n")
    assert result.metrics.exit_code == 127 and result.failure_reason.value == "exit_code"
    assert "/no/such/program was not found in the image" in result.error_message


def test_a_plain_exit_1_stays_exit_1(tmp_path):
    result = _judge(tmp_path, 1, b"failed to exec pid1: No such file or directory\n")
    assert result.metrics.exit_code == 1 and "not found" not in result.error_message


def test_tinis_127_keeps_its_hint(tmp_path):
    result = _judge(tmp_path, 127, b"[FATAL tini (7)] exec /no/such/program failed: No such file or directory\n")
    assert result.metrics.exit_code == 127 and "was not found in the image" in result.error_message
