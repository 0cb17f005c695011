"""The default provider: logs who would get which subject, sends nothing."""

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
        log.info(
            "console email (not sent) id=%s key=%s to=%s subject=%r",
            message_id,
            idempotency_key,
            ", ".join(email.to),
            email.subject,
        )
        return message_id
