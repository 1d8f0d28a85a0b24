"""A job as the agent received it (a poll answer's item, or a job.json a previous agent spooled), parsed once.

Every later step reads the one `ReceivedJob`: the agent keys its table by `job_id`, the job runner runs `spec` or
reports `problem`. Parsing never raises: a job that cannot run still gets its one result (invalid_job), unless it
carries no string id at all, which leaves nothing to report it under.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from .models import JOB_ID_PATTERN, REFUSED_KEY, JobSpec
from .redaction import Redactor

__all__ = ["ReceivedJob"]

# Of a pydantic error list, this many problems are named (the rest are the same kind of mistake, usually).
MAX_PROBLEMS_NAMED = 5


@dataclass(frozen=True)
class ReceivedJob:
    """One received job.

    raw      the item exactly as received (kept in job.json for a re-run; may carry registry_auth)
    job_id   its string job_id, valid or not; None when it has none (it can be neither run nor reported)
    spec     the validated JobSpec; None when the job cannot run
    problem  why it cannot run (the invalid_job message), when `spec` is None
    """

    raw: Any
    job_id: str | None
    spec: JobSpec | None
    problem: str | None

    @classmethod
    def parse(cls, raw: Any, redactor: Redactor | None = None) -> ReceivedJob:
        """Validate `raw` (any JSON value). `redactor` keeps the agent's secrets out of `problem`."""
        job_id = raw.get("job_id") if isinstance(raw, dict) else None
        job_id = job_id if isinstance(job_id, str) and job_id else None
        problem = _problem(raw, job_id, redactor or Redactor())
        if problem is not None:
            return cls(raw, job_id, None, problem)
        try:
            return cls(raw, job_id, JobSpec.model_validate(raw), None)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in err['loc']) or 'job'}: {err['msg'].removeprefix('Value error, ')}"
                for err in exc.errors()[:MAX_PROBLEMS_NAMED]
            )
            return cls(raw, job_id, None, f"invalid job spec: {problems}")

    def describe(self) -> str:
        """What the job is, for a log line, without its content (it may carry credentials)."""
        if isinstance(self.raw, dict):
            return f"an object with {len(self.raw)} key(s), its job_id a JSON {type(self.raw.get('job_id')).__name__}"
        return f"a JSON {type(self.raw).__name__}"


def _problem(raw: Any, job_id: str | None, redactor: Redactor) -> str | None:
    if not isinstance(raw, dict):
        return f"job is a JSON {type(raw).__name__}, not an object"
    refused = raw.get(REFUSED_KEY)
    if isinstance(refused, str):
        return refused
    if job_id is None or not JOB_ID_PATTERN.fullmatch(job_id):
        # Redacted before it is cut: a cut secret would leave a prefix no redaction recognises.
        return f"job_id {redactor.redact_own(str(raw.get('job_id')))[:140]!r} does not match {JOB_ID_PATTERN.pattern}"
    return None
