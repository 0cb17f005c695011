"""Platform users for tests, inserted the way CONTRACT §7 says any client may."""

from __future__ import annotations

import uuid

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker


async def new_user(
    sessions: async_sessionmaker[AsyncSession], email: str | None = None
) -> uuid.UUID:
    """A new user (`INSERT INTO users (id, email)`); email `owner-<id>@example.com` by default."""
    user_id = uuid.uuid4()
    async with sessions.begin() as session:
        await session.execute(
            text("INSERT INTO users (id, email) VALUES (:id, :email)"),
            {"id": user_id, "email": email or f"owner-{user_id.hex[:8]}@example.com"},
        )
    return user_id
