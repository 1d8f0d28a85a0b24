"""Disk hygiene, the first thing that fills on a busy runner: free space on the jobs directory and the engine's
data root is checked before a job is taken, and images that this cluster's jobs pulled can be pruned, least
recently used first, down to a watermark.

Only images jobs of this agent's cluster used are ever pruned (recorded with their last use in
`{jobs_workdir}/.images.json`): an engine may hold images that are none of the agent's business.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .files import write_json_atomic

__all__ = ["DiskGuard", "DiskState", "free_bytes"]

log = logging.getLogger(__name__)
GIB = 1024**3


def free_bytes(path: Path) -> int | None:
    try:
        stat = os.statvfs(path)
    except OSError:
        return None
    return stat.f_bavail * stat.f_frsize


@dataclass
class DiskState:
    jobs_free_gb: float | None
    engine_free_gb: float | None
    low: bool
    reason: str = ""

    def to_wire(self) -> dict[str, Any]:
        return {"jobs_workdir_free_gb": self.jobs_free_gb, "engine_root_free_gb": self.engine_free_gb,
                "low": self.low, "reason": self.reason or None}


class DiskGuard:
    def __init__(
        self,
        jobs_workdir: Path,
        engine_root: Path | None,
        *,
        min_free_gb: float,
        prune_to_free_gb: float,
        engine_api: Any,
        free: Callable[[Path], int | None] = free_bytes,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._jobs = jobs_workdir
        self._engine_root = engine_root if engine_root and engine_root.is_dir() else None
        self._min = min_free_gb
        self._prune_to = prune_to_free_gb
        self._api = engine_api
        self._free = free
        self._clock = clock
        self._lock = threading.Lock()
        self._ledger = jobs_workdir / ".images.json"
        self.state = DiskState(None, None, False)
        if engine_root and self._engine_root is None:
            log.info("the engine's data root %s is not visible here: only the jobs directory's free space is checked "
                     "(in a container, add -v %s:%s:ro so --min-free-disk-gb covers the images' disk too)",
                     engine_root, engine_root, engine_root)

    # --- free space ----------------------------------------------------------------------------------------

    def check(self) -> DiskState:
        """Measure; below the watermark, prune (when enabled) and measure again."""
        state = self._measure()
        if state.low and self._prune_to > 0:
            self.prune(self._prune_to)
            state = self._measure()
        was_low = self.state.low
        self.state = state
        if state.low and not was_low:
            log.error("low disk: %s; taking no jobs until there is room", state.reason)
        elif was_low and not state.low:
            log.info("disk space recovered: taking jobs again")
        return state

    def _measure(self) -> DiskState:
        jobs = self._free(self._jobs)
        engine = self._free(self._engine_root) if self._engine_root else None
        jobs_gb = round(jobs / GIB, 2) if jobs is not None else None
        engine_gb = round(engine / GIB, 2) if engine is not None else None
        reasons = [f"{name} has {gb} GiB free, under --min-free-disk-gb {self._min:g}"
                   for name, gb in (("the jobs directory", jobs_gb), ("the engine's data root", engine_gb))
                   if gb is not None and gb < self._min]
        return DiskState(jobs_gb, engine_gb, bool(reasons), "; ".join(reasons))

    # --- images --------------------------------------------------------------------------------------------

    def _read_ledger(self) -> dict[str, float]:
        try:
            data = json.loads(self._ledger.read_text())
            return {str(k): float(v) for k, v in data.items()} if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    def image_used(self, image: str) -> None:
        with self._lock:
            ledger = self._read_ledger()
            ledger[image] = self._clock()
            try:
                write_json_atomic(self._ledger, ledger)
            except OSError as exc:
                log.debug("image ledger not written: %s", exc)

    def prune(self, target_free_gb: float) -> list[str]:
        """Remove images jobs used and no container uses, least recently used first, until the free space is
        back over `target_free_gb` (or nothing is left to remove)."""
        with self._lock:
            ledger = self._read_ledger()
            in_use = {c.get("ImageID") for c in self._api.containers(all=True)}
            removed = []
            for image, _ in sorted(ledger.items(), key=lambda item: item[1]):
                state = self._measure()
                free = min(x for x in (state.jobs_free_gb, state.engine_free_gb, float("inf")) if x is not None)
                if free >= target_free_gb:
                    break
                try:
                    image_id = self._api.inspect_image(image)["Id"]
                except Exception:  # gone already: forget it
                    ledger.pop(image, None)
                    continue
                if image_id in in_use:
                    continue
                try:
                    self._api.remove_image(image)
                except Exception as exc:  # in use by a tag elsewhere, or removed meanwhile
                    log.info("image %s not pruned: %s", image, exc)
                    continue
                ledger.pop(image, None)
                removed.append(image)
                log.info("pruned image %s (unused; least recently used first)", image)
            try:
                write_json_atomic(self._ledger, ledger)
            except OSError:
                pass
            return removed
