"""`--user ID|EMAIL`: the platform user a command acts for."""

from __future__ import annotations

import uuid

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from db.models import User


async def resolve_user(sessions: async_sessionmaker[AsyncSession], user: str) -> uuid.UUID:
    """The id of the user named by id or (case-insensitive) email; `LookupError` if none."""
    try:
        query = select(User.id).where(User.id == uuid.UUID(user))
        what = "id"
    except ValueError:
        query = select(User.id).where(func.lower(User.email) == user.strip().lower())
        what = "email"
    async with sessions() as session:
        found = await session.scalar(query)
    if found is None:
        raise LookupError(f"no user with {what} {user.strip()}")
    return found
