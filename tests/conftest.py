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
