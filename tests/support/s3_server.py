"""moto's S3 server on a loopback port, so tests speak the real S3 protocol over HTTP.

In-process mocking (`mock_aws`) patches botocore's sync HTTP layer and never reaches
aiobotocore's aiohttp requests, so the tests run moto as a server instead:

    server = S3TestServer(min_part_size_bytes=256 * 1024)
    endpoint_url = server.start()
    server.create_bucket("exports-test")
    ...
    server.stop()

`fake_aws_credentials()` sets the standard AWS variables to dummies for the test process only.
"""

from __future__ import annotations

import contextlib
import logging
import os
import urllib.request
from collections.abc import Iterator
from typing import Any

import boto3
import moto.s3.models
from botocore.exceptions import ClientError
from moto.server import ThreadedMotoServer

#: AWS's (and moto's default) minimum for every part but the last.
AWS_MIN_PART_SIZE_BYTES = 5 * 1024 * 1024
#: The tests' part size, so multipart is exercised with kilobytes, not megabytes. The tests'
#: server lowers moto's minimum to the same value, so moto still rejects any non-last part
#: smaller than ours.
TEST_PART_SIZE_BYTES = 256 * 1024

FAKE_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}
#: Unset so a developer's own profile, session token or config file cannot leak into tests.
_CLEARED = ("AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_PROFILE", "AWS_DEFAULT_PROFILE")


@contextlib.contextmanager
def fake_aws_credentials() -> Iterator[None]:
    """Dummy credentials in os.environ for the duration; the previous values come back after."""
    saved = {name: os.environ.get(name) for name in (*FAKE_CREDENTIALS, *_CLEARED)}
    saved_files = {n: os.environ.get(n) for n in ("AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE")}
    try:
        os.environ.update(FAKE_CREDENTIALS)
        for name in _CLEARED:
            os.environ.pop(name, None)
        for name in saved_files:
            os.environ[name] = os.devnull
        yield
    finally:
        for name, value in {**saved, **saved_files}.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


class S3TestServer:
    """A moto S3 server in a thread of this process, bound to 127.0.0.1 on a free port."""

    def __init__(self, *, min_part_size_bytes: int | None = None) -> None:
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self._min_part_size_bytes = min_part_size_bytes
        self._saved_min_part_size: int | None = None
        self.endpoint_url = ""

    def start(self) -> str:
        """Start serving; returns the endpoint URL (`http://127.0.0.1:PORT`)."""
        if self._min_part_size_bytes is not None:
            # moto reads the S3_UPLOAD_PART_MIN_SIZE variable once, when moto.settings is
            # first imported, and models.py copies it into a module global that
            # FakeMultipart.complete() reads at call time (moto/s3/models.py, EntityTooSmall).
            # Setting that global works whatever was imported before; the variable might not.
            # models.py imports the name from moto.settings without re-exporting it.
            saved = moto.s3.models.S3_UPLOAD_PART_MIN_SIZE  # type: ignore[attr-defined]
            self._saved_min_part_size = saved
            moto.s3.models.S3_UPLOAD_PART_MIN_SIZE = self._min_part_size_bytes  # type: ignore[attr-defined]
        # werkzeug logs every request at INFO; keep test output about the tests.
        logging.getLogger("werkzeug").setLevel(logging.WARNING)
        self._server.start()
        host, port = self._server.get_host_and_port()
        self.endpoint_url = f"http://{host}:{port}"
        return self.endpoint_url

    def stop(self) -> None:
        self._server.stop()
        if self._saved_min_part_size is not None:
            # Put back moto's copy of moto.settings' value (not re-exported: see start).
            moto.s3.models.S3_UPLOAD_PART_MIN_SIZE = self._saved_min_part_size  # type: ignore[attr-defined]
            self._saved_min_part_size = None

    def client(self) -> Any:
        """A plain (sync) boto3 client for setup and inspection from tests."""
        return boto3.client("s3", endpoint_url=self.endpoint_url, region_name="us-east-1")

    def create_bucket(self, name: str) -> None:
        self.client().create_bucket(Bucket=name)

    def reset(self) -> None:
        """Forget every bucket and object (moto's reset API), for test isolation."""
        request = urllib.request.Request(f"{self.endpoint_url}/moto-api/reset", method="POST")
        with urllib.request.urlopen(request, timeout=10) as response:
            response.read()


def client_error(code: str, status: int, message: str = "msg") -> ClientError:
    """The error botocore raises for an S3 reply `status` with error `code` (an UploadPart)."""
    return ClientError(
        {
            "Error": {"Code": code, "Message": message},
            "ResponseMetadata": {
                "RequestId": "",
                "HostId": "",
                "HTTPStatusCode": status,
                "HTTPHeaders": {},
                "RetryAttempts": 0,
            },
        },
        "UploadPart",
    )
