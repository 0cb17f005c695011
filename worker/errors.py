"""The errors that decide what happens to a failed job, drawn in full (a test keeps it so).

    WorkerError                    two texts: `str()` for operators, `public_message` for users
    ├── TransientError             retried with exponential backoff (connection lost, timeout,
    │   │                          429, 5xx)
    │   ├── RateLimited            the provider told us how long to wait: we wait at least that
    │   │   │                      long (429: every process waits, worker.ratelimit)
    │   │   └── ImportRunningElsewhere (jobs.imports.lease) another run holds this import's
    │   │                          lease: back once it could have expired
    │   ├── ProviderFault          the provider refuses our account (API key, sending domain):
    │   │                          nothing is wrong with the job, so it waits for the fix
    │   │                          without using a try; sending halts everywhere
    │   ├── InterruptedAfterProgress a transient failure after this try committed progress
    │   │                          (an import's checkpoint moved on): retried without using a
    │   │                          try, since the next one starts further on
    │   ├── DeliveryUnknown        (worker.email_providers.base) the request may have reached
    │   │                          the provider (read timeout, connection dropped after
    │   │                          sending): resent only where the provider deduplicates
    │   │                          (Resend's Idempotency-Key); with SendGrid held for review
    │   └── ExportBusy             (jobs.exports.job) another worker is writing this export
    └── PermanentError             fails the job now; the message is recorded for a person to
        │                          act on
        ├── HardTimeLimitExceeded  ran past its hard time limit: never retried, it would run as
        │                          long again
        ├── WorkerDied             its worker died on every try (a poison pill): not run again
        ├── FileFormatError        (jobs.imports.sniff) the file cannot be read as a contacts CSV
        └── SourceChanged          (jobs.imports.sources) the import's file is not the one it
                                   started on: never read on with other bytes

Jobs raise these (or let library errors through: `worker.retry` classifies those) and
never call arq's `Retry` themselves, so the retry policy lives in one place (`worker.retry`).
A class drawn with a module lives there, next to the code that raises it.

Every error has two texts. `str(error)` is the operator's: it goes to the logs and may name
hosts, buckets, paths or the driver's detail (SQL values). `error.public_message` is what a
user sees on the job's own row (an import's `message`, an export's `error`): plain words saying
what to do. It defaults to `str(error)`, since errors raised on purpose are written for users
("the file is empty"); whoever wraps infrastructure text passes `public=` as well.

Our other exceptions never reach a job's failure path, so they stand outside the tree:

    ValueError
    ├── CampaignNotConfigured      (jobs.email.drafts) APP_URL or SECRET_KEY missing: no waitlist
    │                              email can carry a working link
    ├── MissingSecretKey           (worker.tokens) SECRET_KEY unset: no token made or checked
    ├── PayloadRefused             (worker.serialization) bytes this project did not write:
    │                              refused, never executed
    └── ConsoleNotConfigured       (worker.web.auth) no CONSOLE_PASSWORD: the console must not
                                   start
    Exception
    ├── ActionRefused              (worker.web.actions) a console action that does not apply to
    │                              the row as it is now (HTTP 409)
    ├── BadSignature               (worker.webhook_signatures) a provider webhook whose
    │                              signature or timestamp does not check out (HTTP 401)
    ├── BodyTooLarge               (worker.web.webhooks) a webhook body over the cap (HTTP 413)
    ├── RemoteJobError             (worker.serialization) a failed job's exception, read back
    │                              from its JSON form
    ├── StartupRefused             (worker.preflight) this worker must not start; the message
    │                              says what to change
    └── UserError                  (worker.cli) an operator's mistake: one line, exit code 2
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


class InterruptedAfterProgress(TransientError):
    """A transient failure that ended a try after it had committed durable progress.

    A long import on a busy cluster can meet more faults (a killed connection, a failover)
    than `MAX_RETRIES` in its life while moving on between each; counting those tries would
    fail a job that was never stuck. The try is given back (worker.retry.decide). Bounded: every
    refunded try committed at least one batch, and a file has finitely many.
    """

    def __init__(self, cause: TransientError, *, progress: str) -> None:
        super().__init__(f"{cause} (after {progress})", public=cause.public_message)
        self.cause = cause


class HardTimeLimitExceeded(PermanentError):
    """The job ran past its hard time limit and was stopped."""


class WorkerDied(PermanentError):
    """The job's worker process died on every try (a poison pill): the job is not run again."""
