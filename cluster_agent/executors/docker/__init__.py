"""The Docker execution mode: job containers on this host's engine, through the Docker SDK.

    executor.py    the Executor: containers (create, attach, start, wait, stop, remove, replay)
    images.py      job images present per the pull policy; pulls bounded in time
    engine_api.py  connecting, engine errors, container state, the multiplexed log stream
    reaper.py      removal, for sure, of containers the agent gave up on
    mode.py        the mode's factory: everything the agent loop needs (see cluster_agent/modes.py)
"""

from .executor import NVIDIA_RUNTIME_FIX, DockerExecutor, connect

__all__ = ["NVIDIA_RUNTIME_FIX", "DockerExecutor", "connect"]
