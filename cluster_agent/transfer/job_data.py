"""The data services one agent shares among its jobs: one downloader, the input cache, one uploader."""

from __future__ import annotations

from dataclasses import dataclass

from ..settings import Settings
from .artifacts import ArtifactPlanner, ArtifactUpload
from .cache import InputCache
from .download import Downloader

__all__ = ["JobData"]


@dataclass
class JobData:
    downloader: Downloader
    uploads: ArtifactUpload
    cache: InputCache | None
    max_input_bytes: int

    @classmethod
    def from_settings(cls, settings: Settings, planner: ArtifactPlanner | None) -> JobData:
        """Raises ConfigError when --cache-dir cannot be used (InputCache.open)."""
        cache = None
        if settings.cache_dir is not None:
            cache = InputCache(settings.cache_dir, settings.cache_max_bytes)
            cache.open()
        return cls(
            downloader=Downloader(retries=settings.transfer_retries, attempt_timeout=settings.transfer_timeout),
            uploads=ArtifactUpload(
                planner, retries=settings.transfer_retries, max_files=settings.max_artifact_files,
                max_bytes=settings.max_artifact_bytes, max_file_bytes=settings.max_artifact_file_bytes,
                attempt_timeout=settings.transfer_timeout,
            ),
            cache=cache,
            max_input_bytes=settings.max_input_bytes,
        )

    def release(self, job_id: str) -> None:
        """The job's container is done: its cached inputs may be evicted again."""
        if self.cache is not None:
            self.cache.release(job_id)

    def close(self) -> None:
        self.downloader.close()
        self.uploads.close()
        if self.cache is not None:
            self.cache.close()
