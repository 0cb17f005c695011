"""The metrics tests run real worker processes with the fault tests' rig (`processes`)."""

from tests.reliability.conftest import processes

__all__ = ["processes"]
