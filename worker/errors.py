"""The errors that decide what happens to a failed job.

    WorkerError
    ├── TransientError   retried with exponential backoff (connection lost, timeout, 429, 5xx)
    │   └── RateLimited  the provider told us how long to wait: we wait at least that long
    └── PermanentError   fails the job now; the message is recorded for a person to act on

Jobs raise these (or let library errors through: `worker.retry` classifies those) and
never call arq's `Retry` themselves, so the retry policy lives in one place.
"""

from __future__ import annotations


class WorkerError(Exception):
    """Base of every error this project raises on purpose."""


class TransientError(WorkerError):
    """A failure that may succeed when tried again later."""


class RateLimited(TransientError):
    """The remote side asked us to wait `retry_after_s` seconds before trying again."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class PermanentError(WorkerError):
    """A failure that will not go away by retrying (bad input, a 4xx, a missing row)."""
