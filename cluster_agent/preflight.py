"""Start-up checks every mode makes (the jobs directory, the cluster token): each failure is a ConfigError that
names the setting and the fix (exit code 2). A mode's own checks are in its package (executors/*/mode.py)."""

from __future__ import annotations

import os
import threading
from pathlib import Path

from .control_plane import ControlPlaneClient
from .errors import ConfigError, ControlPlaneError, TokenRejected
from .files import write_atomic
from .settings import Settings

__all__ = ["check_jobs_workdir", "resolve_token"]


def check_jobs_workdir(path: Path) -> None:
    where = "--jobs-workdir / RADIX_JOBS_WORKDIR"
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".radix-write-probe-{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(
            f"{where}: cannot write to {path}: {exc.strerror or exc}; create it and give the agent's user write "
            "access, or choose another directory"
        ) from None


def resolve_token(settings: Settings, client: ControlPlaneClient, cancel: threading.Event) -> str:
    """The cluster token: the setting, else the token file, else a one-time token exchanged and saved."""
    if settings.cluster_token is not None and settings.cluster_token.get_secret_value():
        return settings.cluster_token.get_secret_value()
    token_file = settings.token_file
    where = "--token-file / RADIX_TOKEN_FILE"
    try:
        saved = token_file.read_text().strip() if token_file.exists() else ""
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read {token_file}: {exc.strerror}") from None
    if saved:
        return saved
    if settings.one_time_token is None or not settings.one_time_token.get_secret_value():
        raise ConfigError(
            "no cluster token: give --cluster-token / RADIX_CLUSTER_TOKEN, or --one-time-token / RADIX_ONE_TIME_TOKEN "
            f"on the first start (the exchanged token is then saved in {token_file})"
        )
    # Check the file can be written before spending the one-time token.
    try:
        token_file.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        if not os.access(token_file.parent, os.W_OK):
            raise PermissionError(13, "Permission denied")
    except OSError as exc:
        raise ConfigError(f"{where}: cannot write {token_file.parent}: {exc.strerror}; the exchanged token must be saved") from None
    try:
        token = client.exchange_token(settings.one_time_token.get_secret_value(), cancel=cancel, attempts=0)
    except TokenRejected:
        raise ConfigError(
            "--one-time-token / RADIX_ONE_TIME_TOKEN was rejected by the control plane (it may have been used "
            "already); get a new one, or give the cluster token with --cluster-token"
        ) from None
    except ControlPlaneError as exc:
        raise ConfigError(f"token exchange failed: {exc}") from None
    write_atomic(token_file, (token + "\n").encode(), mode=0o600)
    return token
