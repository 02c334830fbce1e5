"""The grpc.aio server: ext_proc, health, hot reload and graceful drain."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ep_grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from atp_extproc import config as config_mod
from atp_extproc import envoy_api, logs
from atp_extproc.config import (
    ConfigError,
    Server,
    Snapshot,
    envoy_buffer_limit,
    unix_socket_path,
    unix_socket_problem,
)
from atp_extproc.envoy_api import ProcessingRequest, ProcessingResponse
from atp_extproc.exchange import ABANDONED, INCOMPLETE_RESPONSE, Exchange
from atp_extproc.policy.settings import include_matches
from atp_extproc.services import Services

log = logging.getLogger("atp.server")

EXT_PROC_SERVICE = "envoy.service.ext_proc.v3.ExternalProcessor"
# gRPC metadata the shadow listener's ext_proc filter sends (grpc_service.initial_metadata):
# a client cannot set it, so it is what tells a mirrored copy from a client request.
ROLE_METADATA = ("x-atp-role", "shadow")
# Bodies above this are inspected (and answers above it restored) on a worker thread.
OFFLOAD_BODY_BYTES = 128 * 1024
# Envoy's default ext_proc message_timeout: an answer that held the loop this long may
# have come after Envoy stopped waiting for it.
_SLOW_ANSWER_S = 0.2
# gRPC's message limit, fixed whatever max_body_bytes says: twice the largest buffer
# Envoy has for any max_body_bytes ATP accepts (256 MiB, Envoy's default HTTP/2 stream
# window too). Envoy sends past its buffer: an answer ATP reads STREAMED comes as Envoy
# has it, what it queued while ATP answered the response headers in one message (9 MB
# failed a limit of 8.25, and the client got a 413 for its answer), and over HTTP/2 a
# request body comes whole (ATP answers its own 413). The bound keeps one message from
# taking all of ATP's memory.
GRPC_MESSAGE_LIMIT = 2 * envoy_buffer_limit(
    Server.model_fields["max_body_bytes"].metadata[-1].le)


def grpc_server_options() -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", GRPC_MESSAGE_LIMIT),
        ("grpc.max_send_message_length", GRPC_MESSAGE_LIMIT),
        ("grpc.so_reuseport", 0),
        # BDP probes are PINGs that size flow-control windows for bulk transfers; on
        # Envoy's local link they only add frames and wakeups to every exchange.
        ("grpc.http2.bdp_probe", 0),
    ]


class StartupError(Exception):
    """ATP cannot start where it was asked to (an address in use or not bindable); the
    message names the address and the reason."""


@dataclass(frozen=True)
class ServeOptions:
    """`serve`'s command-line options: they win over atp.yaml, at start and on reload."""

    listen: str | None = None
    log_level: str | None = None


def _fixed_at_start(snapshot: Snapshot, options: ServeOptions) -> dict[str, object]:
    """What the process sets up once, from the snapshot it starts with: the gRPC server
    binds once, the ledger's writer opens its file once. (ledger.baseline and
    max_body_bytes are read per request.)"""
    ledger = snapshot.ledger
    # Without a writer its settings are not in use: turning it on or off is one change.
    writer = ({"ledger.path": ledger.path, "ledger.flush_interval_s": ledger.flush_interval_s}
              if ledger.enabled else {})
    return {
        "server.listen": options.listen or snapshot.server.listen,
        "ledger.enabled": ledger.enabled,
        **writer,
    }


# The files a config reads and its policy.include globs (Snapshot.files, .include_globs).
_Sources = tuple[tuple[str, ...], tuple[str, ...]]
# Per file (and for what policy.include matches), what tells an edit: name, stat.
_Stamp = tuple[tuple[str, object], ...]
# Loads of a config whose files keep changing under them before the change waits for the
# next poll (an editor or a deploy tool writing a file in pieces settles within these).
_SETTLE_TRIES = 3


def _policies_changed(old: Snapshot, new: Snapshot) -> str:
    """Which policies a reload took away or added, for its log line: a policy file
    deleted (or a glob no longer matching it) drops its denies without a word otherwise."""
    def ids(snapshot: Snapshot) -> set[str]:
        return {p.id for p in snapshot.policies.policies} if snapshot.policies else set()
    before, after = ids(old), ids(new)
    parts = [f"{what} {', '.join(sorted(names))}" for what, names in (
        ("policies removed:", before - after), ("policies added:", after - before)) if names]
    return f"; {'; '.join(parts)}" if parts else ""


_POLL_SLICE_S = 1.0


def _matches_now(pattern: str) -> list[str]:
    try:
        return include_matches(pattern)
    except ValueError:  # a pattern the config holds refused ("a**b"): it matches nothing
        return []


class ConfigHolder:
    """The snapshot in force. A swap is one attribute assignment: each exchange keeps
    the snapshot in force when its body came, so a reload never changes a request once
    decided."""

    def __init__(self, path: Path, snapshot: Snapshot,
                 options: ServeOptions = ServeOptions(),
                 stamp: tuple[_Stamp, _Sources] | None = None):
        """`stamp`: the files' stamp taken before `snapshot` was read, and what it
        covers (see load); without it, the snapshot's files are stamped now."""
        self.path = path
        self.current = snapshot
        self.options = options
        self.fixed_at_start = _fixed_at_start(snapshot, options)
        # The files (and include globs) stamped: the ones the file named when it was
        # last read, loaded or refused, so a poll compares like with like.
        self._sources: _Sources = (snapshot.files, snapshot.include_globs)
        if stamp is None:
            stamp = self._file_stamp(), self._sources
        self._stamp, self._sources = stamp
        # The last reload was refused: the next that loads says the file is valid again.
        self._rejected = False
        # One reload at a time, off the event loop (see reload_off_loop).
        self._reloading = threading.Lock()
        # Set once ATP drains: reloads still queued (a burst of SIGHUPs) are skipped, or
        # each held the exit, and the ledger's last flush, for a whole reload.
        self.stopped = False
        self._tasks: set[asyncio.Task[None]] = set()

    @classmethod
    def load(cls, path: Path, options: ServeOptions = ServeOptions()) -> ConfigHolder:
        """`path` loaded and held, stamped before it is read, as reload() does: an edit
        made while ATP starts (the load takes up to a second) is then a reload at the
        first poll, not taken as loaded."""
        stamp, snapshot = cls._load_settled(path, cls._stamp_now(path))
        return cls(path, snapshot, options, stamp)

    @classmethod
    def _load_settled(cls, path: Path, stamp: tuple[_Stamp, _Sources]
                      ) -> tuple[tuple[_Stamp, _Sources], Snapshot]:
        """`path` loaded, with the stamp taken before (`stamp`, taken just now): loaded
        again while its files change under the load. atp.yaml and the policy files it
        includes are read one after the other, and a Kubernetes ConfigMap update swaps
        them all at once in between: the snapshot would hold atp.yaml of one version and
        policies of the other, a config neither version is."""
        changed: set[str] = set()
        for _ in range(_SETTLE_TRIES):
            try:
                snapshot = config_mod.load(path)
            except ConfigError:
                after = cls._stamp_now(path)
                if after == stamp:
                    raise
            else:
                after = cls._stamp_now(path)
                if after == stamp:
                    return stamp, snapshot
            changed |= {name for name, _ in set(stamp[0]) ^ set(after[0])}
            stamp = after  # taken after one load, before the next
        raise ConfigError(str(path), [(", ".join(sorted(changed)), (
            f"changed while ATP read the config, {_SETTLE_TRIES} times in a row (a file "
            "written without pause?); the config in force stays, and the next poll tries "
            "again"))])

    @classmethod
    def _stamp_now(cls, path: Path) -> tuple[_Stamp, _Sources]:
        sources = config_mod.files_read_by(path)
        return cls._stamp_of(path, *sources), sources

    def _file_stamp(self) -> _Stamp:
        return self._stamp_of(self.path, *self._sources)

    @staticmethod
    def _stamp_of(path: Path, files: tuple[str, ...],
                  include_globs: tuple[str, ...]) -> _Stamp:
        # atp.yaml, every policy file it includes, and what policy.include matches now
        # (a new file there is a reload too): an edit to any is a reload.
        matched = sorted({m for pattern in include_globs for m in _matches_now(pattern)})
        stamps: list[tuple[str, object]] = [("policy.include", tuple(matched))]
        # What the globs match now too: a new file the last reload refused is not among
        # the snapshot's files, and its fix must reload as well.
        # One name per file: the snapshot names a file as shown (relative to the working
        # directory), a glob match is absolute.
        for name in dict.fromkeys(map(os.path.abspath, (str(path), *files[1:], *matched))):
            try:
                st = os.stat(name)
            except OSError:
                stamps.append((name, None))
                continue
            # ctime too: `cp -p`, `touch -r` or an archive keep mtime (and often size).
            stamps.append((name, (st.st_mtime_ns, st.st_ctime_ns, st.st_size, st.st_ino)))
        return tuple(stamps)

    def reload(self, reason: str) -> bool:
        # Stamped before loading, never after: files still changing when the load gave
        # up are then seen by the next poll, not taken as loaded. What the file names
        # now is stamped: a policy.include just changed reloads once.
        try:
            self._stamp, self._sources = self._stamp_now(self.path)
            (self._stamp, self._sources), snapshot = self._load_settled(
                self.path, (self._stamp, self._sources))
            # As check does: a file ATP could not restart with is not taken, though a
            # new ledger.path or server.listen only applies at a restart.
            config_mod.check_paths(snapshot, listen_option=self.options.listen is not None,
                                   ledger_open=self.fixed_at_start.get("ledger.path"))
        except ConfigError as exc:
            self._rejected = True
            log.error("config reload rejected (%s); keeping version %s:\n%s",
                      reason, self.current.version, exc)
            return False
        except Exception:
            # A fault in the loader itself must not end the watcher (later fixes would
            # never load) nor escape a signal handler: the old snapshot stays.
            self._rejected = True
            log.exception("config reload failed (%s); keeping version %s", reason,
                          self.current.version)
            return False
        # First: a more verbose level must already let the lines below through.
        self._apply_log_level(snapshot.server.log_level)
        if snapshot.version != self.current.version:
            log.info("config reloaded (%s): version %s → %s%s", reason,
                     self.current.version, snapshot.version,
                     _policies_changed(self.current, snapshot))
        elif self._rejected:
            # The file is back to what runs: without a word, the last line about it
            # would still be the rejection.
            log.info("config reloaded (%s): the file is valid again, the version in "
                     "force, %s; the earlier rejection no longer applies", reason,
                     snapshot.version)
        else:
            # An operator's SIGHUP deserves an answer even when nothing changed.
            log.info("config reloaded (%s): unchanged, version %s", reason,
                     snapshot.version)
        self._rejected = False
        # Against what runs, not the last file: a value put back needs no restart. Said
        # once per version, not again at every later reload.
        fixed = [f"{name} changed (the file says {value!r}, ATP runs with "
                 f"{self.fixed_at_start[name]!r})"
                 for name, value in _fixed_at_start(snapshot, self.options).items()
                 if self.fixed_at_start.get(name, value) != value]
        if fixed and snapshot.version != self.current.version:
            log.warning("config reloaded (%s): %s; these take effect when ATP restarts",
                        reason, "; ".join(fixed))
        self.current = snapshot
        return True

    async def reload_off_loop(self, reason: str) -> None:
        """reload() on a worker thread: parsing and compiling a large config (thousands
        of models or policies) on the event loop held every request for seconds. The
        swap is one attribute assignment, which requests read whole."""
        def one_at_a_time() -> None:
            with self._reloading:
                if not self.stopped:
                    self.reload(reason)

        await asyncio.to_thread(one_at_a_time)

    def reload_soon(self, reason: str) -> None:
        """reload_off_loop from a signal handler, which cannot await."""
        task = asyncio.get_running_loop().create_task(self.reload_off_loop(reason))
        self._tasks.add(task)  # held, or the loop's weak reference lets it be collected
        task.add_done_callback(self._tasks.discard)

    def _apply_log_level(self, level: str) -> None:
        if level == self.current.server.log_level:
            return
        if self.options.log_level is not None:
            log.info("server.log_level %s not applied: --log-level %s wins", level,
                     self.options.log_level)
            return
        change = ("log level %s → %s", self.current.server.log_level, level)
        # Said at the more verbose of the two levels, so that it is seen either way.
        if logging.getLevelName(level) < logging.getLevelName(self.current.server.log_level):
            logs.set_level(level)
            log.info(*change)
        else:
            log.info(*change)
            logs.set_level(level)

    async def watch(self) -> None:
        # Polling the file's stat rather than inotify: Kubernetes ConfigMaps and editors
        # replace files through symlink swaps and renames that inotify watches can miss.
        seen: _Stamp | None = None
        while True:
            # In slices: a reload that shortens reload_poll_s applies now, not once the
            # old interval (minutes, say) has passed.
            polled = time.monotonic()
            while (wait := polled + self.current.server.reload_poll_s
                   - time.monotonic()) > 0:
                await asyncio.sleep(min(wait, _POLL_SLICE_S))
            try:
                now = self._file_stamp()
                # Loaded once the files stood still for a poll: a file written without
                # pause (a log an include glob matches) would otherwise have every poll
                # load the config on the event loop, and never settle.
                if now != self._stamp and now == seen:
                    await self.reload_off_loop("file changed")
                seen = now
            except Exception:
                log.exception("config watch: cannot check %s; trying again", self.path)


class ExternalProcessor(ep_grpc.ExternalProcessorServicer):
    def __init__(self, holder: ConfigHolder, services: Services | None = None):
        self.holder = holder
        self.services = services
        self.in_flight = 0
        self.draining = False
        # The drain's grace period ended: what is cancelled now, ATP cut off itself.
        self.grace_over = False
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="atp-inspect")
        # Answers restore on a thread of their own: behind big request bodies in one
        # queue, a small request's 200 KB answer waited past message_timeout (a 504
        # for an answer the model had given).
        self._restore_pool = ThreadPoolExecutor(max_workers=1,
                                                thread_name_prefix="atp-restore")
        self._idle = asyncio.Event()
        self._idle.set()

    async def Process(
        self, request_iterator: AsyncIterator[ProcessingRequest], context
    ) -> AsyncIterator[ProcessingResponse]:
        if self.draining:
            # Envoy fails the request closed (no upstream sees it) and, with several
            # ATP endpoints, its health checks move traffic to the others.
            await context.abort(grpc.StatusCode.UNAVAILABLE, "ATP is draining")
        shadow = ROLE_METADATA in (context.invocation_metadata() or ())
        exchange = Exchange(self.holder.current, services=self.services, shadow=shadow)
        self.in_flight += 1
        self._idle.clear()
        message: ProcessingRequest | None = None
        headers: ProcessingRequest | None = None  # until the body came
        # What the config in force at the body strips from the request's headers, sent
        # with the body's answer when that config is not the one the headers were read
        # under (a trusted tenant header it added).
        strip: list[str] = []
        try:
            async for message in request_iterator:
                # Off the loop, a cancel reaches the await above, not the yield below.
                held_loop_s = 0.0
                if message.HasField("request_headers"):
                    headers = message
                elif headers is not None and message.HasField("request_body"):
                    if exchange.snapshot is not self.holder.current:
                        # ATP decides at the body: under the config in force now. A
                        # request whose headers came before a reload revoked its key was
                        # served with it, however long it took to send its body.
                        began = exchange.started  # the record's duration counts from here
                        exchange = Exchange(self.holder.current, services=self.services,
                                            shadow=shadow)
                        exchange.started = began
                        answer = exchange.handle(headers)
                        if answer is not None and answer.HasField("immediate_response"):
                            yield answer
                            return
                        if answer is not None:
                            strip = list(answer.request_headers.response
                                         .header_mutation.remove_headers)
                    headers = None
                try:
                    if (message.HasField("request_body")
                            and len(message.request_body.body) > OFFLOAD_BODY_BYTES):
                        response = await self._inspect_off_loop(exchange, message)
                    elif (message.HasField("response_body")
                            and exchange.restorer is not None
                            and len(message.response_body.body)
                            + exchange.response_work_bytes > OFFLOAD_BODY_BYTES):
                        # Restoring a big answer's placeholders takes as long as
                        # inspecting it.
                        response = await asyncio.get_running_loop().run_in_executor(
                            self._restore_pool, _without_gc, exchange.handle, message)
                    else:
                        started = time.perf_counter()
                        response = exchange.handle(message)
                        held_loop_s = time.perf_counter() - started
                except asyncio.CancelledError:
                    _abandoned(exchange, message, grace_over=self.grace_over)
                    raise
                if strip and response is not None and response.HasField("request_body"):
                    response.request_body.response.header_mutation.remove_headers.extend(strip)
                strip = []
                if message.observability_mode:
                    # Envoy never reads these answers, and keeps the stream open until the
                    # server closes it: close it once the response has ended.
                    if _response_ended(message):
                        return
                    continue
                if response is not None:
                    try:
                        yield response
                    except (asyncio.CancelledError, GeneratorExit):
                        # Envoy had stopped waiting while ATP worked (the loop was held
                        # past message_timeout): the answer went nowhere. But Envoy also
                        # resets the stream as soon as it has the last answer it needs,
                        # which can cancel gRPC's write of it after it went out: a fast
                        # last answer was taken (a few % of requests were recorded failed).
                        last = (response.HasField("immediate_response")
                                or exchange.response_ended)
                        slow = held_loop_s >= _SLOW_ANSWER_S
                        if not last or slow:
                            # A fast answer went nowhere because the client left (or
                            # Envoy refused ATP's headers, a 431): nothing for the
                            # operator to fix in ATP.
                            _abandoned(exchange, message, warn=slow or self.grace_over,
                                       grace_over=self.grace_over)
                        raise
                    if response.HasField("immediate_response"):
                        return
        except asyncio.CancelledError:
            rec = exchange.record
            if self.grace_over and exchange.passed_unread and not rec.error_code:
                # Cut by the drain while the answer was on its way (Envoy closes the
                # stream once the answer is through): one whose body ATP did not read (a
                # compressed one) was recorded whole.
                rec.error_code = INCOMPLETE_RESPONSE
            elif (self.grace_over and message is not None and exchange.model is None
                    and rec.operation and not rec.error_code):
                # Cut by the drain while the request's body was still coming: recorded
                # as the client's (request_incomplete), with nothing in the log.
                _abandoned(exchange, message, grace_over=True)
            raise
        except Exception:
            # ATP failed (gRPC logs the traceback) and Envoy resets the stream: an answer
            # on its way never came whole, though its body may have read to its end.
            if exchange.record.status and not exchange.record.error_code:
                exchange.record.error_code = INCOMPLETE_RESPONSE
            raise
        finally:
            try:
                # A stream that ended before its first message (a connection Envoy
                # dropped) was no request: no record.
                if message is not None:
                    exchange.finish()
            finally:
                # Idle once the record is written: the drain closes the ledger then.
                self.in_flight -= 1
                if self.in_flight == 0:
                    self._idle.set()

    async def _inspect_off_loop(self, exchange: Exchange,
                                message: ProcessingRequest) -> ProcessingResponse:
        # Parsing, redacting and checking a large body takes long enough to stall every
        # other exchange; a worker thread runs it while the loop serves the rest (the
        # GIL is handed over every switch interval).
        loop = asyncio.get_running_loop()
        refused = await loop.run_in_executor(self._pool, _without_gc, exchange.inspect_body,
                                             message)
        return refused if refused is not None else exchange.route_body()

    async def drain(self, grace: float) -> bool:
        """Refuse new exchanges; wait up to `grace` for in-flight ones. True if all ended."""
        self.draining = True
        if self._idle.is_set():  # wait_for with no time left times out even then
            return True
        try:
            await asyncio.wait_for(self._idle.wait(), timeout=grace)
        except TimeoutError:
            return False
        return True


# How long cancelled exchanges may take to unwind at exit (a record each: quick).
_UNWIND_S = 5.0


def _add_servicer(processor: ExternalProcessor, server: grpc.aio.Server) -> None:
    """What `add_ExternalProcessorServicer_to_server` does, with Envoy's messages read by
    `envoy_api.read_processing_request`, which hands the exchange one it cannot fully
    read."""
    handlers = {"Process": grpc.stream_stream_rpc_method_handler(
        processor.Process, request_deserializer=envoy_api.read_processing_request,
        response_serializer=ProcessingResponse.SerializeToString)}
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(EXT_PROC_SERVICE, handlers),))
    server.add_registered_method_handlers(EXT_PROC_SERVICE, handlers)


class HealthServicer(health.aio.HealthServicer):
    """The library's servicer leaves out List (added to grpc.health.v1 in 2024), which
    then logs a traceback per call: answered from the statuses it keeps."""

    async def List(self, request: health_pb2.HealthListRequest,
                   context: grpc.aio.ServicerContext) -> health_pb2.HealthListResponse:
        return health_pb2.HealthListResponse(statuses={
            service: health_pb2.HealthCheckResponse(status=status)
            for service, status in self._server_status.items()})


def _abandoned(exchange: Exchange, message: ProcessingRequest, warn: bool = True,
               grace_over: bool = False) -> None:
    """Envoy closed the stream while ATP worked on a message: it stopped waiting
    (message_timeout; the client got a 504) or the client left; or (`grace_over`) ATP's
    own drain cut it. The record says so; with `warn`, the log says it, as ATP being too
    slow is the operator's to fix."""
    rec = exchange.record
    phase = message.WhichOneof("request") or "a message"
    # Once the answer was coming back, the model had the request: the answer did not
    # reach its end, which the ledger counts failed. Before, nothing reached a model.
    rec.error_code = rec.error_code or (
        INCOMPLETE_RESPONSE if phase.startswith("response_") else ABANDONED)
    body = getattr(message, phase).body if phase.endswith("_body") else b""
    if grace_over:
        # Not Envoy's timeout nor the client: tuning those would change nothing.
        log.warning("ATP stopped working on %s (%d bytes) of request %s: its drain's "
                    "server.grace_period_s was over", phase, len(body),
                    rec.request_id or "-")
        return
    log.log(logging.WARNING if warn else logging.DEBUG,
            "Envoy stopped waiting for ATP's answer to %s (%d bytes) of request %s: "
            "message_timeout passed, or the client left", phase, len(body),
            rec.request_id or "-")


async def watch_loop(interval_s: float = 0.25, stall_s: float = 1.0) -> None:
    """Warn when the event loop was held: every exchange waited meanwhile, and one that
    waited past Envoy's message_timeout got a 504 from Envoy without ATP ever reading it,
    so no record and no other warning tells the operator (a blocking call, a machine out
    of CPU, a paused process)."""
    loop = asyncio.get_running_loop()
    while True:
        before = loop.time()
        await asyncio.sleep(interval_s)
        held = loop.time() - before - interval_s
        if held >= stall_s:
            log.warning("ATP's event loop was held for %.1f s: exchanges waited that long, "
                        "and any past Envoy's message_timeout were answered 504 by Envoy "
                        "without an ATP record", held)


def _response_ended(message: ProcessingRequest) -> bool:
    phase = message.WhichOneof("request")
    return (phase == "response_trailers"
            or (phase == "response_body" and message.response_body.end_of_stream)
            or (phase == "response_headers" and message.response_headers.end_of_stream))


def _without_gc(fn, *args):
    # A body of tens of thousands of small objects sets off cyclic GC passes that hold
    # the GIL for tens of ms, which no switch interval can split; refcounting frees all
    # of it anyway.
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        return fn(*args)
    finally:
        if was_enabled:
            gc.enable()


def bind(server: grpc.aio.Server, listen: str) -> None:
    """Bind `server` to `listen` (as config.Server accepts it), or raise StartupError."""
    check_listen(listen)
    try:
        port = server.add_insecure_port(listen)
    except RuntimeError as exc:  # current grpcio raises where older ones returned 0
        raise StartupError(f"cannot listen on {listen}: {exc}") from None
    if port == 0 and not listen.startswith("unix:"):  # a Unix socket has no port number
        raise StartupError(f"cannot listen on {listen}: gRPC could not bind it")


def check_listen(listen: str) -> None:
    """Raise StartupError, naming the address and the OS's reason, if `listen` cannot be
    bound. Checked before gRPC binds: gRPC takes a socket path over from a process still
    listening there (it unlinks the file first), and where it cannot bind it logs a line
    of its own and raises a RuntimeError that says no more than that. A socket file
    nothing accepts on any more is removed here, as gRPC would."""
    path = unix_socket_path(listen)
    problem = _unix_problem(path) if path is not None else _tcp_problem(listen)
    if problem is not None:
        raise StartupError(f"cannot listen on {listen}: {problem}")


def _unix_problem(path: str) -> str | None:
    # What the file system shows, as check and reloads see it; then what only binding (a
    # directory ATP may not write in) or connecting (a socket in use) tells.
    problem = unix_socket_problem(path)
    if problem is not None:
        return problem
    if os.path.islink(path) and not os.path.exists(path):
        # Bound, it said "Address already in use".
        return (f"it is a symbolic link to {os.readlink(path)}, which does not exist: "
                "name the socket's own path")
    if not os.path.exists(path):
        return _unix_bind_problem(path)
    accepting = _accepting(path)
    if accepting:
        return "already in use: another process accepts connections on this socket"
    # Left by a process that died (nothing accepts on it): removed here, as gRPC would,
    # so that where ATP may not (another user's, in a sticky directory) it says why,
    # not gRPC's "Address already in use" and a line of its own.
    # (Where ATP may not connect to tell, None, it may still remove the file, as gRPC
    # would: a root-owned one left in ATP's own directory.)
    try:
        os.unlink(path)
    except OSError as exc:
        if accepting is None:
            return "ATP may neither connect to the socket there to see whether it is in " \
                f"use nor remove it: {_reason(exc)}"
        return f"a socket file a stopped process left is there, and ATP cannot remove it: " \
            f"{_reason(exc)}"
    return None


def _accepting(path: str) -> bool | None:
    """Whether a process accepts connections on the socket at `path`; None where ATP may
    not connect to tell (another user's socket): that is no stale one to remove."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.settimeout(1.0)
        try:
            client.connect(path)
        except TimeoutError:
            return True  # its backlog is full: a live server, if a busy one
        except PermissionError:
            return None
        except OSError:
            return False
        return True


def _unix_bind_problem(path: str) -> str | None:
    error = _bind_error(socket.AF_UNIX, path)
    if error is None:
        os.unlink(path)  # the probe's socket file: gRPC makes its own
        return None
    return _reason(error)


def _tcp_problem(listen: str) -> str | None:
    host, _, port = listen.rpartition(":")
    try:
        addresses = socket.getaddrinfo(host.strip("[]"), int(port), type=socket.SOCK_STREAM,
                                       flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        return f"cannot resolve {host}: {exc.strerror}"
    errors = [error for family, _, _, _, address in addresses
              if (error := _bind_error(family, address)) is not None]
    # gRPC binds each address the host resolves to that it can, and needs one.
    return _reason(errors[0]) if len(errors) == len(addresses) else None


def _bind_error(family: socket.AddressFamily, address: str | tuple[Any, ...]) -> OSError | None:
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        # As gRPC binds: a port held only by connections still closing is free.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            return exc
    return None


def _reason(error: OSError) -> str:
    return error.strerror or str(error)


async def serve(config_path: Path, options: ServeOptions = ServeOptions(),
                stopped_early: Callable[[], bool] = lambda: False) -> int:
    """Serve until SIGTERM or SIGINT, then drain; 0 once stopped so. `stopped_early`
    says whether a stop signal came before the loop's handlers were installed."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    if stopped_early():
        stop.set()  # start up all the same, then drain at once: a clean exit
    holder = ConfigHolder.load(config_path, options)
    snapshot = holder.current
    loop.add_signal_handler(signal.SIGHUP, holder.reload_soon, "SIGHUP")
    listen = options.listen or snapshot.server.listen

    # A large body inspected on the worker thread holds the GIL in slices of this
    # interval; shorter slices keep the other exchanges' added wait small.
    sys.setswitchinterval(0.001)
    # The ledger opens before the socket is made: refused, it left the socket file.
    services = Services.start(snapshot)
    server = grpc.aio.server(options=grpc_server_options())
    bind(server, listen)
    processor = ExternalProcessor(holder, services)
    _add_servicer(processor, server)
    health_servicer = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    await server.start()
    # Everything loaded so far (config, CEL programs, detectors, protobuf descriptors) lives
    # as long as the process: move it out of the collector's sight, so a full collection
    # pauses for what requests allocate, not for that (~40 ms pauses otherwise, at p99).
    gc.collect()
    gc.freeze()
    for service in ("", EXT_PROC_SERVICE):
        await health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
    log.info("ATP serving on %s (config %s, version %s)", listen, config_path,
             snapshot.version)
    # What ATP fixed at start, for an operator asking why a limit applies.
    log.debug("fixed until restart: %s; gRPC options %s", holder.fixed_at_start,
              dict(grpc_server_options()))

    watcher = asyncio.create_task(holder.watch())
    expiry = asyncio.create_task(services.run_expiry())
    log_flush = asyncio.create_task(logs.flush_every())
    loop_watch = asyncio.create_task(watch_loop())

    await stop.wait()
    settings = holder.current.server
    grace = settings.grace_period_s
    log.info("draining: NOT_SERVING, exchanges in flight: %d, grace %.1fs",
             processor.in_flight, grace)
    # Health first, so checks see NOT_SERVING while in-flight exchanges finish.
    await health_servicer.enter_graceful_shutdown()
    watcher.cancel()
    holder.stopped = True
    if settings.drain_delay_s:
        log.info("still taking new exchanges for %.1fs (server.drain_delay_s), until "
                 "Envoy's health checks move them to other endpoints",
                 settings.drain_delay_s)
        await asyncio.sleep(settings.drain_delay_s)
    drained = await processor.drain(grace)
    if not drained:
        log.warning("grace period over: cancelling the exchanges in flight: %d",
                    processor.in_flight)
        processor.grace_over = True
    await server.stop(0)
    # The exchanges stop(0) cancelled write their records and ledger rows as their
    # handlers unwind: the ledger closes after them ("ledger is closed" lost them).
    await processor.drain(_UNWIND_S)
    expiry.cancel()
    log_flush.cancel()
    loop_watch.cancel()
    await services.close()
    # Stopped: a late signal changes nothing. Left to the loop's close, each would get
    # its default action back, and a SIGHUP then ended ATP, not with its 0.
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        loop.remove_signal_handler(sig)
        signal.signal(sig, signal.SIG_IGN)
    log.info("stopped")
    return 0
