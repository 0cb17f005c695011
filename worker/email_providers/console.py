"""The development provider (`EMAIL_PROVIDER=console`): logs who would get which subject."""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass

from worker.email_providers.base import OutgoingEmail

log = logging.getLogger("worker.email")


@dataclass(frozen=True, slots=True)
class ConsoleProvider:
    """For development: bodies are not logged (they may carry sign-in links)."""

    name: str = "console"

    async def send(self, email: OutgoingEmail, idempotency_key: str) -> str:
        message_id = f"console-{uuid.uuid4()}"
        # Each line says so: a reader of the logs must never take this for a delivery.
        log.info(
            "NOT SENT (EMAIL_PROVIDER=console, nothing left this process) id=%s key=%s "
            "to=%s subject=%r",
            message_id,
            idempotency_key,
            ", ".join(email.to),
            email.subject,
        )
        return message_id
