"""Structured logs: one JSON object a line, on stderr."""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import io
import logging
import sys
import time
from collections.abc import Iterator
from typing import Any, BinaryIO

import orjson

# stderr through a buffer: setup() points both the handler and the exchange lines here.
# None until then (in-process use goes through logging's handlers as usual).
_out: BinaryIO | None = None
# Exchange lines wait in the buffer at most this long (see flush_every), like Envoy's
# access log file_flush_interval: one write per request costs a syscall per request.
FLUSH_INTERVAL_S = 0.25
_BUFFER_BYTES = 1 << 16
_GRPC_LOGGER = "grpc._cython.cygrpc"


def _encode(entry: dict[str, Any]) -> bytes:
    return orjson.dumps(entry, default=str, option=orjson.OPT_NON_STR_KEYS)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": round(record.created, 3),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "record", None)
        if fields is not None:
            entry.update(fields)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return _encode(entry).decode()


def info_record(logger: logging.Logger, msg: str, fields: dict[str, Any]) -> None:
    """`logger.info(msg)` carrying `fields`, the same line JsonFormatter writes.

    For the line every exchange writes: building a LogRecord and walking the handler
    chain cost more than encoding the line, so once setup() has run it goes straight
    into the stderr buffer, written out by size, by flush_every, or with the next line
    logged through logging (which flushes it).
    """
    if not logger.isEnabledFor(logging.INFO):
        return
    if _out is None:
        logger.info(msg, extra={"record": fields})
        return
    _out.write(_encode({"ts": round(time.time(), 3), "level": "INFO",
                        "logger": logger.name, "msg": msg, **fields}) + b"\n")


def flush() -> None:
    if _out is not None:
        _out.flush()


async def flush_every(interval_s: float = FLUSH_INTERVAL_S) -> None:
    """Write buffered lines out at least every `interval_s` (run as a task)."""
    while True:
        await asyncio.sleep(interval_s)
        flush()


def setup(level: str) -> None:
    global _out
    if _out is None:
        sys.stderr.flush()
        _out = open(sys.stderr.fileno(), "wb", buffering=_BUFFER_BYTES,
                    closefd=False)
        atexit.register(flush)
    _install(_out, level)


def set_level(level: str) -> None:
    """The level of every logger without one of its own (all of ATP's), e.g. on reload."""
    root = logging.getLogger()
    root.setLevel(level)
    # grpc.aio logs a line per call at DEBUG ("Loaded running loop"), which would bury
    # ATP's own; gRPC's C core has GRPC_VERBOSITY and GRPC_TRACE for its debugging.
    logging.getLogger(_GRPC_LOGGER).setLevel(max(root.level, logging.INFO))


def _install(out: BinaryIO, level: str) -> None:
    # The handler's lines share the buffer (and flush it, exchange lines included), so
    # all lines stay whole and in order.
    handler = logging.StreamHandler(io.TextIOWrapper(out, encoding="utf-8",
                                                     write_through=True))
    handler.setFormatter(JsonFormatter())
    logging.getLogger().handlers[:] = [handler]
    set_level(level)


@contextlib.contextmanager
def redirected(level: str, out: BinaryIO) -> Iterator[None]:
    """The server's logging, as setup(level) makes it, into `out` instead of stderr; the
    process's logging is put back on exit. For measuring exchanges in process: without
    it each exchange line would take logging's slower LogRecord path."""
    global _out
    root, grpc_logger = logging.getLogger(), logging.getLogger(_GRPC_LOGGER)
    saved = root.handlers[:], root.level, grpc_logger.level, _out
    _out = out
    try:
        _install(out, level)
        yield
    finally:
        out.flush()
        root.handlers[:], level_before, grpc_level_before, _out = saved
        root.setLevel(level_before)
        grpc_logger.setLevel(grpc_level_before)
