"""ATP's log levels: its own loggers follow the configured level, gRPC's stays quiet."""

from __future__ import annotations

import io
import logging

import pytest

from atp_extproc import logs

GRPC = logging.getLogger("grpc._cython.cygrpc")


def test_debug_shows_atps_lines_but_not_grpcs_line_per_call() -> None:
    # At DEBUG, grpc.aio logged "Loaded running loop" for every call: most of the log.
    sink = io.BytesIO()
    with logs.redirected("DEBUG", sink):
        assert logging.getLogger("atp.exchange").isEnabledFor(logging.DEBUG)
        assert not GRPC.isEnabledFor(logging.DEBUG)
        assert GRPC.isEnabledFor(logging.INFO)


@pytest.mark.parametrize("level", ["WARNING", "ERROR"])
def test_grpc_is_never_more_verbose_than_atp(level: str) -> None:
    sink = io.BytesIO()
    with logs.redirected(level, sink):
        assert not GRPC.isEnabledFor(logging.getLevelName(level) - 10)
        logs.set_level("DEBUG")  # as a reload does
        assert not GRPC.isEnabledFor(logging.DEBUG)
        logs.set_level(level)
        assert not GRPC.isEnabledFor(logging.getLevelName(level) - 10)
