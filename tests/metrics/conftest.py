"""The metrics tests run real worker processes with the fault tests' rig (`processes`), and
email sends against the email tests' loopback provider (`provider_server`, `job_settings`)."""

from tests.email.conftest import job_settings, provider_server, provider_server_session
from tests.reliability.conftest import processes

__all__ = ["job_settings", "processes", "provider_server", "provider_server_session"]
