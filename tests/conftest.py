import os

import pytest

# The environment is the agent's configuration: keep the developer's RADIX_* settings out of the tests.
for _name in list(os.environ):
    if _name.startswith("RADIX_"):
        del os.environ[_name]


@pytest.fixture
def no_radix_env(monkeypatch):
    for name in list(os.environ):
        if name.startswith("RADIX_"):
            monkeypatch.delenv(name)


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "engine: an engine-suite test, also run against Podman (AGENT_TEST_ENGINE=podman; make test does)")
    config.addinivalue_line("markers", "podman_only: run only against Podman (AGENT_TEST_ENGINE=podman)")
