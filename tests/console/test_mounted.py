"""The console mounted in a host app (CONTRACT §12), served by real uvicorn: Starlette runs no
lifespan for a mounted app, and every link, redirect and API address must carry the mount path."""

from __future__ import annotations

import re
import uuid
from collections.abc import AsyncIterator

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Mount, Route

from tests.console.conftest import PASSWORD
from tests.support.asgi_server import serve_asgi
from worker.client import JobsClient
from worker.settings import Settings
from worker.web.console import create_app


async def _host_home(request: Request) -> PlainTextResponse:
    return PlainTextResponse("the host app")


@pytest.fixture
async def host(console_settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """A host app with the console at /ops, over real HTTP; no session yet."""
    console = create_app(console_settings)
    app = Starlette(routes=[Route("/", _host_home), Mount("/ops", app=console)])
    try:
        async with serve_asgi(app) as base_url, httpx.AsyncClient(base_url=base_url) as client:
            yield client
    finally:
        await console.state.console.aclose()  # what a host's own lifespan would do


async def test_a_mounted_console_redirects_and_links_under_its_mount_path(
    host: httpx.AsyncClient,
) -> None:
    assert (await host.get("/")).text == "the host app"
    answer = await host.get("/ops/imports")
    assert answer.status_code == 303 and answer.headers["location"] == "/ops/login"
    form = await host.get("/ops/login")
    assert 'action="/ops/login"' in form.text and 'href="/ops/static/console.css"' in form.text
    assert (await host.get("/ops/static/console.css")).status_code == 200

    signed_in = await host.post("/ops/login", data={"username": "admin", "password": PASSWORD})
    assert signed_in.status_code == 303 and signed_in.headers["location"] == "/ops/"
    overview = await host.get("/ops/")
    assert overview.status_code == 200
    assert 'data-api="/ops/api/overview"' in overview.text and 'data-root="/ops"' in overview.text
    links = re.findall(r'(?:href|src|action)="([^"]+)"', overview.text)
    assert links and all(link.startswith("/ops/") for link in links), links
    queues = (await host.get("/ops/api/overview")).json()["queues"]
    assert set(queues) == {"imports", "exports", "default"}


async def test_a_mounted_console_cancels_an_import_and_redirects_back_under_its_path(
    host: httpx.AsyncClient, jobs_client: JobsClient, settings: Settings, user_id: uuid.UUID
) -> None:
    folder = settings.import_dir / str(user_id)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "a.csv").write_text("email\nann@example.com\n")
    import_id = (await jobs_client.import_contacts(user_id, "a.csv")).id
    await host.post("/ops/login", data={"username": "admin", "password": PASSWORD})
    page = await host.get(f"/ops/imports/{import_id}")
    token = re.search(r'<meta name="csrf-token" content="([^"]+)">', page.text)
    assert token is not None
    assert f'action="/ops/api/imports/{import_id}/cancel"' in page.text

    # The page's own form: its `next` field brings the browser back to the mounted page.
    answer = await host.post(
        f"/ops/api/imports/{import_id}/cancel",
        data={"csrf_token": token[1], "next": f"/ops/imports/{import_id}"},
    )
    assert answer.status_code == 303 and answer.headers["location"] == f"/ops/imports/{import_id}"
    assert (await jobs_client.import_status(import_id)).status == "cancelled"
