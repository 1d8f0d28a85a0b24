"""The Docker execution mode: job containers on this host's engine, through the Docker SDK.

    executor.py   the Executor
    reaper.py     removal, for sure, of containers the agent gave up on
    runtime.py    the mode's factory: everything the agent loop needs (see cluster_agent/runtime.py)
"""

from .executor import NVIDIA_RUNTIME_FIX, DockerExecutor, connect

__all__ = ["NVIDIA_RUNTIME_FIX", "DockerExecutor", "connect"]
