import subprocess
import sys
from pathlib import Path

import pytest

from cluster_agent.cli import load_settings
from cluster_agent.errors import ConfigError
from cluster_agent.settings import Settings, env_name, flag_name

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_follow_the_contract():
    settings = load_settings({})
    assert settings.poll_interval == 30
    assert settings.heartbeat_interval == 300
    assert settings.long_poll_seconds == 25
    assert settings.job_timeout == 3600
    assert settings.max_concurrent_jobs == 1
    assert settings.tenant_id == "demo-tenant"
    assert str(settings.jobs_workdir) == "/tmp/radix-jobs"
    assert str(settings.token_file) == "/var/lib/radix/cluster_token"
    assert settings.execution_mode == "docker"
    assert settings.shutdown_grace == 30


def test_env_names_follow_the_contract():
    assert env_name("poll_interval") == "RADIX_POLL_INTERVAL_SECONDS"
    assert env_name("heartbeat_interval") == "RADIX_HEARTBEAT_INTERVAL_SECONDS"
    assert env_name("job_timeout") == "RADIX_JOB_TIMEOUT_SECONDS"
    assert env_name("max_concurrent_jobs") == "RADIX_MAX_CONCURRENT_JOBS"
    assert env_name("api_base") == "RADIX_API_BASE"
    assert flag_name("long_poll_seconds") == "--long-poll-seconds"


def test_env_vars_are_read(monkeypatch):
    monkeypatch.setenv("RADIX_API_BASE", "https://cp.example.com/api/")
    monkeypatch.setenv("RADIX_CLUSTER_ID", "gpu-1")
    monkeypatch.setenv("RADIX_POLL_INTERVAL_SECONDS", "7")
    monkeypatch.setenv("RADIX_MAX_CONCURRENT_JOBS", "3")
    settings = load_settings({})
    assert settings.api_base == "https://cp.example.com/api"  # trailing slash dropped
    assert settings.cluster_id == "gpu-1"
    assert settings.poll_interval == 7
    assert settings.max_concurrent_jobs == 3


def test_cli_wins_over_env(monkeypatch):
    monkeypatch.setenv("RADIX_POLL_INTERVAL_SECONDS", "7")
    monkeypatch.setenv("RADIX_TENANT_ID", "from-env")
    settings = load_settings({"poll_interval": "2", "tenant_id": "from-cli"})
    assert settings.poll_interval == 2
    assert settings.tenant_id == "from-cli"


@pytest.mark.parametrize(
    "url",
    ["http://example.com", "http://10.0.0.5:8080/api"],
)
def test_plain_http_is_refused_off_loopback(url):
    with pytest.raises(ConfigError, match="allow-insecure-http"):
        load_settings({"api_base": url})


@pytest.mark.parametrize("url", ["http://127.0.0.1:8080", "http://localhost/api", "http://[::1]:9000"])
def test_plain_http_is_allowed_on_loopback(url):
    assert load_settings({"api_base": url}).api_base == url


def test_insecure_http_can_be_allowed_explicitly():
    assert load_settings({"api_base": "http://example.com", "allow_insecure_http": True}).api_base == "http://example.com"


@pytest.mark.parametrize(
    "values, message",
    [
        ({"api_base": "ftp://x"}, "--api-base / RADIX_API_BASE"),
        ({"api_base": "not a url"}, "--api-base / RADIX_API_BASE"),
        ({"api_base": "https://user:pw@cp.example.com"}, "no credentials"),
        ({"poll_interval": "soon"}, "--poll-interval / RADIX_POLL_INTERVAL_SECONDS"),
        ({"max_concurrent_jobs": "0"}, "--max-concurrent-jobs / RADIX_MAX_CONCURRENT_JOBS"),
        ({"cluster_id": "has space"}, "--cluster-id / RADIX_CLUSTER_ID"),
        ({"log_level": "LOUD"}, "--log-level / RADIX_LOG_LEVEL"),
        # Settings that pass start-up but would fail every job: refused at start-up, naming the fix.
        ({"jobs_workdir": "relative/jobs"}, "give an absolute one"),
        ({"allowed_images": " , "}, "give '*' to allow any image"),
        ({"cap_drop": "NET_RAW,NOT_A_CAP"}, "NOT_A_CAP is not a Linux capability"),
        ({"docker_host": "/var/run/docker.sock"}, "unix:///var/run/docker.sock"),
        # A size with a unit the parser does not know names the units it does.
        ({"cache_max_bytes": "10XB"}, "--cache-max-bytes / RADIX_CACHE_MAX_BYTES: could not interpret byte unit: XB "
                                      "(give a whole number of bytes, or a number and a unit: KB, MB, GB, TB"),
        ({"max_output_bytes": "lots"}, "--max-output-bytes / RADIX_MAX_OUTPUT_BYTES: could not parse value and unit"),
    ],
)
def test_bad_values_name_the_setting(values, message):
    with pytest.raises(ConfigError) as caught:
        load_settings(values)
    assert message in str(caught.value)


@pytest.mark.parametrize("name", ["heartbeat_interval", "self_test_interval", "poll_interval", "job_timeout",
                                  "shutdown_grace", "min_free_disk_gb"])
@pytest.mark.parametrize("value", ["inf", "nan", "1e12"])
def test_a_number_no_wait_can_take_is_refused_at_start_up(name, value):
    """`--self-test-interval inf` was taken, then killed the self-test thread (OverflowError in its wait) while the
    agent went on looking healthy; the heartbeat thread the same."""
    if name == "min_free_disk_gb" and value == "1e12":
        return  # not a wait: a large watermark is only a strict one
    with pytest.raises(ConfigError, match=f"{flag_name(name)} / {env_name(name)}"):
        load_settings({name: value})


def test_every_size_in_bytes_takes_a_unit():
    # The README says sizes in bytes take a unit: every *_bytes setting, not some of them.
    names = [name for name in Settings.model_fields if name.endswith("_bytes")]
    settings = load_settings({name: "10MiB" for name in names})
    assert names and all(getattr(settings, name) == 10 * 1024**2 for name in names)
    assert load_settings({"max_output_bytes": "500KB"}).max_output_bytes == 500_000


def test_the_agent_requires_api_base_and_cluster_id():
    with pytest.raises(ConfigError, match="--api-base / RADIX_API_BASE is required"):
        load_settings({"cluster_id": "c"}).require_agent_settings()


def _main(*args, env=None):
    import os

    full_env = {k: v for k, v in os.environ.items() if not k.startswith("RADIX_")}
    full_env.update(env or {})
    return subprocess.run([sys.executable, "main.py", *args], cwd=ROOT, capture_output=True, text=True, env=full_env, timeout=60)


def test_help_lists_every_setting_with_env_var_and_default():
    result = _main("--help")
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    for name, info in Settings.model_fields.items():
        assert flag_name(name) in text
        assert env_name(name) in text
    assert "default: 30.0" in text and "default: /tmp/radix-jobs" in text
    # Choice settings say their allowed values.
    assert "one of: always, if-not-present, never; env RADIX_PULL_POLICY" in text
    assert "one of: DEBUG, INFO, WARNING, ERROR; env RADIX_LOG_LEVEL" in text
    assert "one of: docker, slurm;" in text


def test_missing_required_setting_exits_2_without_traceback():
    result = _main()
    assert result.returncode == 2
    assert "--api-base / RADIX_API_BASE is required" in result.stderr
    assert "Traceback" not in result.stderr


def test_malformed_url_exits_2_without_traceback():
    result = _main("--api-base", "htp:/nope", "--cluster-id", "c")
    assert result.returncode == 2
    assert "RADIX_API_BASE" in result.stderr and "Traceback" not in result.stderr


def test_insecure_http_exits_2():
    result = _main(env={"RADIX_API_BASE": "http://radix.example.com", "RADIX_CLUSTER_ID": "c"})
    assert result.returncode == 2
    assert "--allow-insecure-http" in result.stderr


def test_unwritable_jobs_dir_exits_2(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    result = _main("--api-base", "http://127.0.0.1:9", "--cluster-id", "c", "--jobs-workdir", str(blocker / "jobs"))
    assert result.returncode == 2
    assert "--jobs-workdir / RADIX_JOBS_WORKDIR" in result.stderr and "Traceback" not in result.stderr


def test_unreachable_engine_exits_2(tmp_path):
    result = _main(
        "--api-base", "http://127.0.0.1:9", "--cluster-id", "c", "--jobs-workdir", str(tmp_path),
        "--docker-host", f"unix://{tmp_path}/no.sock",
    )
    assert result.returncode == 2
    assert "Docker engine" in result.stderr and "start dockerd" in result.stderr
    assert "Traceback" not in result.stderr
