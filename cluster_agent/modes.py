"""The execution modes, one factory each: a new mode is a new package under executors/ and one line here."""

from __future__ import annotations

from typing import Callable

from .executors.docker.mode import open_mode as open_docker
from .executors import ExecutionMode
from .executors.slurm.mode import open_mode as open_slurm
from .metrics import Metrics
from .settings import Settings

__all__ = ["ExecutionMode", "open_mode"]

FACTORIES: dict[str, Callable[[Settings, Metrics | None], ExecutionMode]] = {
    "docker": open_docker,
    "slurm": open_slurm,
}


def open_mode(settings: Settings, metrics: Metrics | None = None) -> ExecutionMode:
    """The parts of `--execution-mode`; raises ConfigError when the mode cannot work on this host."""
    return FACTORIES[settings.execution_mode](settings, metrics)
