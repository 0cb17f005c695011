"""A customer's file with a script URL in a LinkedIn cell: that row is refused, the rest imports."""

from __future__ import annotations

import uuid

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from tests.imports.conftest import contacts, counts, import_bytes
from worker.client import JobsClient
from worker.context import Ctx

Sessions = async_sessionmaker[AsyncSession]


async def test_only_http_and_https_linkedin_urls_are_stored(
    ctx: Ctx, jobs_client: JobsClient, user_id: uuid.UUID, sessions: Sessions
) -> None:
    data = (
        "email,LinkedIn URL\n"
        "ann@x.io,https://www.linkedin.com/in/ann\n"
        "xss@x.io,javascript:alert(document.cookie)\n"
        "bob@x.io,HTTP://LinkedIn.com/in/bob\n"
        'data@x.io,"data:text/html,<script>alert(1)</script>"\n'
        "ftp@x.io,ftp://linkedin.com/in/ftp\n"
        "bare@x.io,linkedin.com/in/bare\n"
        "empty@x.io,\n"
    )
    status = await import_bytes(ctx, jobs_client, user_id, data)
    assert counts(status) == ("completed", 7, 7, 3, 0, 4)
    errors = await jobs_client.import_errors(status.id)
    assert [(e.row_number, e.message) for e in errors] == [
        (row, "linkedin_url: not an http(s) URL") for row in (3, 5, 6, 7)
    ]
    assert errors[0].payload == {
        "email": "xss@x.io",
        "LinkedIn URL": "javascript:alert(document.cookie)",
    }
    stored = {c["email"]: c["linkedin_url"] for c in await contacts(sessions, user_id)}
    assert stored == {
        "ann@x.io": "https://www.linkedin.com/in/ann",
        "bob@x.io": "HTTP://LinkedIn.com/in/bob",
        "empty@x.io": None,
    }
