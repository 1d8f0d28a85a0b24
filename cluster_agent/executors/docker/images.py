"""Job images on the Docker engine: present per the pull policy, pulled once at a time, with a total timeout and a
stall limit (docker-py streams pulls with no read timeout of its own)."""

from __future__ import annotations

import logging
import queue
import threading
from typing import Any

import docker
from docker.errors import APIError, ImageNotFound
from docker.utils import parse_repository_tag

from ...clock import Clock
from ...errors import EngineUnavailable, JobFailed
from ...models import FailureReason
from .engine_api import engine_call, explain

__all__ = ["ImagePuller"]

log = logging.getLogger(__name__)

PULL_FIX = (
    "check the image's name and tag, and the registry login (the job's registry_auth, or the engine's docker "
    "config); or load the image onto this host (docker load) and run with --pull-policy never"
)
# An image found present is taken as present this long without asking the engine again (seconds); one removed
# meanwhile is found by the container's create, which then makes it present again.
PRESENT_FOR_SECONDS = 60.0
# While a pull runs, its progress is logged this often (seconds).
PULL_REPORT_EVERY_SECONDS = 10.0


# What a container's die event says of it besides its labels (moby daemon/monitor.go, container.LogEvent): a label
# of one of these names would be read as the engine's own.
EVENT_ATTRIBUTES = frozenset({"exitCode", "execDuration", "name", "image", "signal"})


class ImagePuller:
    """`pull_timeout` bounds a whole pull, `pull_stall_seconds` the wait for its next progress item (seconds)."""

    def __init__(self, api: docker.APIClient, *, clock: Clock, pull_timeout: float, pull_stall_seconds: float) -> None:
        self._api = api
        self._clock = clock
        self._pull_timeout = pull_timeout
        self._pull_stall = pull_stall_seconds
        # Jobs asking for one missing image pull it once: the first pulls, the others wait for it and then find it.
        # Different images are pulled side by side.
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()
        self._present_at: dict[str, float] = {}  # when each image was last found present (monotonic)
        self._forges_events: dict[str, bool] = {}  # per image: its labels name an exit event's own attributes
        self._pulled_since: dict[str, float] = {}  # when the last pull of each image began (monotonic); under its lock

    def _lock_for(self, image: str) -> threading.Lock:
        with self._locks_guard:
            return self._locks.setdefault(image, threading.Lock())

    def prepare(self, image: str, policy: str = "if-not-present", auth: dict[str, str] | None = None) -> None:
        """Make `image` present per `policy` (always, if-not-present, never). Without `auth`, the SDK uses the
        credentials of the engine user's docker config (DOCKER_CONFIG or ~/.docker/config.json) for the image's
        registry. Raises JobFailed(image_unavailable) or EngineUnavailable.

        Parallel jobs share one pull: with `always`, a pull that began after a job asked serves that job too."""
        asked = self._clock.monotonic()
        if policy == "if-not-present" and self.assumed_present(image):
            # Found present moments ago: no engine round trip on every job's path to running. If it went away
            # since, the container's create says so and the executor comes back here (after forget()).
            return
        with engine_call(f"prepare image {image}"):
            if policy != "always" and self._present(image, policy):
                self._mark_present(image)
                return  # the common case takes no lock: jobs on a present image never wait for each other
            with self._lock_for(image):
                if policy != "always" and self._present(image, policy):
                    self._mark_present(image)
                    return  # the job before this one pulled it
                if policy == "always" and self._pulled_since.get(image, float("-inf")) >= asked:
                    return
                began = self._clock.monotonic()
                self._pull(image, auth)
                try:
                    self._note_labels(image, self._api.inspect_image(image))
                except ImageNotFound:
                    raise JobFailed(FailureReason.IMAGE_UNAVAILABLE, f"image {image} is still missing after its pull") from None
                self._pulled_since[image] = began  # only a pull that worked serves the jobs waiting for it
                self._mark_present(image)

    def assumed_present(self, image: str) -> bool:
        """Found present within the last PRESENT_FOR_SECONDS."""
        with self._locks_guard:
            seen = self._present_at.get(image)
        return seen is not None and self._clock.monotonic() - seen < PRESENT_FOR_SECONDS

    def forget(self, image: str) -> None:
        with self._locks_guard:
            self._present_at.pop(image, None)

    def _mark_present(self, image: str) -> None:
        with self._locks_guard:
            self._present_at[image] = self._clock.monotonic()

    def forges_events(self, image: str) -> bool:
        """Whether a container of `image` could carry a forged exit in its engine events: Docker copies a
        container's labels (the image's included) into its event attributes after its own, so an image label
        `exitCode` replaces the real one. True for an image not inspected here (unknown is not trusted)."""
        with self._locks_guard:
            return self._forges_events.get(image, True)

    def _note_labels(self, image: str, info: Any) -> None:
        labels = ((info or {}).get("Config") or {}).get("Labels") or {} if isinstance(info, dict) else {}
        with self._locks_guard:
            self._forges_events[image] = bool(set(labels) & EVENT_ATTRIBUTES)

    def _present(self, image: str, policy: str) -> bool:
        try:
            self._note_labels(image, self._api.inspect_image(image))
            return True
        except ImageNotFound:
            if policy == "never":
                raise JobFailed(
                    FailureReason.IMAGE_UNAVAILABLE,
                    f"image {image} is not on this host and --pull-policy is never: load it onto the host first",
                ) from None
            return False
        except APIError as exc:
            raise JobFailed(FailureReason.IMAGE_UNAVAILABLE, f"image {image}: {explain(exc)}") from None

    def _pull(self, image: str, auth: dict[str, str] | None) -> None:
        log.info("pulling image %s", image)
        repository, tag = parse_repository_tag(image)
        started = last_report = self._clock.monotonic()
        layers: dict[str, str] = {}
        # docker-py streams pulls with no read timeout, so a stalled registry would hang the job: the stream is
        # read on a worker thread, and this thread waits for each item with the stall limit.
        items: queue.Queue[Any] = queue.Queue(maxsize=1000)
        done = object()

        def read() -> None:
            try:
                for item in self._api.pull(repository, tag=tag or "latest", stream=True, decode=True, auth_config=auth):
                    items.put(item)
                items.put(done)
            except Exception as exc:  # handed to the waiting thread
                items.put(exc)

        threading.Thread(target=read, name=f"pull-{repository}", daemon=True).start()
        while True:
            item = self._next_item(items, image, started)
            if item is done:
                break
            if isinstance(item, APIError):
                raise JobFailed(FailureReason.IMAGE_UNAVAILABLE, f"cannot pull image {image}: {explain(item)}; {PULL_FIX}")
            if isinstance(item, Exception):
                raise EngineUnavailable(f"the image pull broke off: {item}")
            if not isinstance(item, dict):
                continue
            if item.get("error"):
                raise JobFailed(FailureReason.IMAGE_UNAVAILABLE, f"cannot pull image {image}: {item['error']}; {PULL_FIX}")
            if item.get("id") and item.get("status"):
                layers[item["id"]] = item["status"]
            if self._clock.monotonic() - last_report >= PULL_REPORT_EVERY_SECONDS:
                complete = sum(1 for status in layers.values() if status in ("Pull complete", "Already exists"))
                log.info("pulling image %s: %d of %d layer(s) done after %.0f s",
                         image, complete, len(layers), self._clock.monotonic() - started)
                last_report = self._clock.monotonic()
        log.info("pulled image %s in %.1f s", image, self._clock.monotonic() - started)

    def _next_item(self, items: queue.Queue[Any], image: str, started: float) -> Any:
        while True:
            remaining = self._pull_timeout - (self._clock.monotonic() - started)
            if remaining <= 0:
                raise JobFailed(
                    FailureReason.IMAGE_UNAVAILABLE,
                    f"pulling image {image} took longer than --pull-timeout {self._pull_timeout:g} s",
                )
            try:
                return items.get(timeout=min(self._pull_stall, remaining))
            except queue.Empty:
                if remaining <= self._pull_stall:
                    continue  # the total timeout above says it
                raise JobFailed(
                    FailureReason.IMAGE_UNAVAILABLE,
                    f"pulling image {image} made no progress for {self._pull_stall:g} s (--pull-stall-seconds): the "
                    "registry is unreachable or stalled",
                ) from None
