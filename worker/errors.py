"""The errors that decide what happens to a failed job.

    WorkerError
    ├── TransientError    retried with exponential backoff (connection lost, timeout, 429, 5xx)
    │   ├── RateLimited   the provider told us how long to wait: we wait at least that long
    │   └── ProviderFault the provider refuses our account (API key, sending domain): nothing
    │                     is wrong with the job, so it waits for the fix without using a try
    └── PermanentError    fails the job now; the message is recorded for a person to act on

Jobs raise these (or let library errors through: `worker.retry` classifies those) and
never call arq's `Retry` themselves, so the retry policy lives in one place.

Every error has two texts. `str(error)` is the operator's: it goes to the logs and may name
hosts, buckets, paths or the driver's detail (SQL values). `error.public_message` is what a
user sees on the job's own row (an import's `message`, an export's `error`): plain words saying
what to do. It defaults to `str(error)`, since errors raised on purpose are written for users
("the file is empty"); whoever wraps infrastructure text passes `public=` as well.
"""

from __future__ import annotations


class WorkerError(Exception):
    """Base of every error this project raises on purpose."""

    def __init__(self, message: str, *, public: str | None = None) -> None:
        super().__init__(message)
        self._public = public

    @property
    def public_message(self) -> str:
        """The text for users: no hosts, buckets, paths or SQL detail."""
        return self._public if self._public is not None else str(self)


class TransientError(WorkerError):
    """A failure that may succeed when tried again later."""


class RateLimited(TransientError):
    """The remote side asked us to wait `retry_after_s` seconds before trying again."""

    def __init__(self, message: str, retry_after_s: float, *, public: str | None = None) -> None:
        super().__init__(message, public=public)
        self.retry_after_s = retry_after_s


class PermanentError(WorkerError):
    """A failure that will not go away by retrying (bad input, a 4xx, a missing row)."""


class ProviderFault(TransientError):
    """The provider refused the account, not the message (a missing or revoked API key, an
    unverified sending domain): every send would fail the same way until an operator fixes it.

    Sending pauses for `retry_after_s` on every worker; messages stay pending, and jobs wait
    without using up a try (worker.job), so nothing is failed for a fault that is not theirs.
    """

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s
