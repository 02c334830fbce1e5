"""The grpc.aio server: ext_proc, health, hot reload and graceful drain."""

from __future__ import annotations

import asyncio
import gc
import glob
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ep_grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from atp_extproc import config as config_mod
from atp_extproc import logs
from atp_extproc.config import ConfigError, Snapshot
from atp_extproc.envoy_api import ProcessingRequest, ProcessingResponse
from atp_extproc.exchange import Exchange
from atp_extproc.services import Services

log = logging.getLogger("atp.server")

EXT_PROC_SERVICE = "envoy.service.ext_proc.v3.ExternalProcessor"
# gRPC metadata the shadow listener's ext_proc filter sends (grpc_service.initial_metadata):
# a client cannot set it, so it is what tells a mirrored copy from a client request.
ROLE_METADATA = ("x-atp-role", "shadow")
# Bodies above this are inspected (and answers above it restored) on a worker thread.
OFFLOAD_BODY_BYTES = 128 * 1024
# Room above the largest body for the rest of the ProcessingRequest (headers, metadata).
_GRPC_OVERHEAD_BYTES = 256 * 1024
# The body buffer limit of the shipped Envoy configs (envoy/*.yaml,
# per_connection_buffer_limit_bytes): Envoy sends ATP bodies up to it, whatever ATP's own
# max_body_bytes says.
ENVOY_BUFFER_LIMIT_BYTES = 8 * 1024 * 1024


def grpc_receive_limit(max_body_bytes: int) -> int:
    """gRPC's receive limit: above Envoy's buffer limit, so a big body reaches ATP, which
    answers its own 413, rather than failing as gRPC's RESOURCE_EXHAUSTED (an Envoy 500).
    Envoy's limit is the shipped one, or twice max_body_bytes when that is raised
    (README: Envoy buffers twice what ATP accepts); lowering max_body_bytes alone leaves
    Envoy's limit where it was."""
    return max(2 * max_body_bytes, ENVOY_BUFFER_LIMIT_BYTES) + _GRPC_OVERHEAD_BYTES


def grpc_server_options(max_body_bytes: int) -> list[tuple[str, int]]:
    limit = grpc_receive_limit(max_body_bytes)
    return [
        ("grpc.max_receive_message_length", limit),
        ("grpc.max_send_message_length", limit),
        ("grpc.so_reuseport", 0),
        # BDP probes are PINGs that size flow-control windows for bulk transfers; on
        # Envoy's local link they only add frames and wakeups to every exchange.
        ("grpc.http2.bdp_probe", 0),
    ]


class ConfigHolder:
    """The snapshot in force. A swap is one attribute assignment: each exchange keeps
    the snapshot it started with, so a reload never changes a request mid-flight."""

    def __init__(self, path: Path, snapshot: Snapshot):
        self.path = path
        self.current = snapshot
        self._stamp = self._file_stamp()

    def _file_stamp(self) -> tuple[object, ...]:
        # atp.yaml, every policy file it includes, and what policy.include matches now
        # (a new file there is a reload too): an edit to any is a reload.
        snapshot = self.current
        matched = sorted({m for pattern in snapshot.include_globs
                          for m in glob.glob(pattern, recursive=True)})
        stamps: list[object] = [tuple(matched)]
        # What the globs match now too: a new file the last reload refused is not among
        # the snapshot's files, and its fix must reload as well.
        for name in dict.fromkeys((str(self.path), *snapshot.files[1:], *matched)):
            try:
                st = os.stat(name)
            except OSError:
                stamps.append(None)
                continue
            stamps.append((st.st_mtime_ns, st.st_size, st.st_ino))
        return tuple(stamps)

    def reload(self, reason: str) -> bool:
        self._stamp = self._file_stamp()
        try:
            snapshot = config_mod.load(self.path)
        except ConfigError as exc:
            log.error("config reload rejected (%s); keeping version %s:\n%s",
                      reason, self.current.version, exc)
            return False
        except Exception:
            # A fault in the loader itself must not end the watcher (later fixes would
            # never load) nor escape a signal handler: the old snapshot stays.
            log.exception("config reload failed (%s); keeping version %s", reason,
                          self.current.version)
            return False
        if snapshot.version != self.current.version:
            log.info("config reloaded (%s): version %s → %s", reason,
                     self.current.version, snapshot.version)
        fixed = _fixed_at_start(self.current, snapshot)
        if fixed:
            log.warning("config reloaded (%s): %s changed, which takes effect when ATP "
                        "restarts", reason, ", ".join(fixed))
        self.current = snapshot
        self._stamp = self._file_stamp()
        return True

    async def watch(self) -> None:
        # Polling the file's stat rather than inotify: Kubernetes ConfigMaps and editors
        # replace files through symlink swaps and renames that inotify watches can miss.
        while True:
            await asyncio.sleep(self.current.server.reload_poll_s)
            try:
                if self._file_stamp() != self._stamp:
                    self.reload("file changed")
            except Exception:
                log.exception("config watch: cannot check %s; trying again", self.path)


class ExternalProcessor(ep_grpc.ExternalProcessorServicer):
    def __init__(self, holder: ConfigHolder, services: Services | None = None):
        self.holder = holder
        self.services = services
        self.in_flight = 0
        self.draining = False
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="atp-inspect")
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
        try:
            async for message in request_iterator:
                if (message.HasField("request_body")
                        and len(message.request_body.body) > OFFLOAD_BODY_BYTES):
                    response = await self._inspect_off_loop(exchange, message)
                elif (message.HasField("response_body") and exchange.restorer is not None
                        and len(message.response_body.body) + exchange.response_work_bytes
                        > OFFLOAD_BODY_BYTES):
                    # Restoring a big answer's placeholders takes as long as inspecting it.
                    response = await asyncio.get_running_loop().run_in_executor(
                        self._pool, _without_gc, exchange.handle, message)
                else:
                    response = exchange.handle(message)
                if message.observability_mode:
                    # Envoy never reads these answers, and keeps the stream open until the
                    # server closes it: close it once the response has ended.
                    if _response_ended(message):
                        return
                    continue
                if response is not None:
                    yield response
                    if response.HasField("immediate_response"):
                        return
        finally:
            self.in_flight -= 1
            if self.in_flight == 0:
                self._idle.set()
            exchange.finish()

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
        try:
            await asyncio.wait_for(self._idle.wait(), timeout=grace)
        except TimeoutError:
            return False
        return True


def _fixed_at_start(old: Snapshot, new: Snapshot) -> list[str]:
    """Settings a reload changed that only a restart applies: the ledger's writer opens
    its file once, the gRPC server binds once and sizes its message limit once."""
    changed = [("ledger", old.ledger != new.ledger),
               ("server.listen", old.server.listen != new.server.listen),
               ("server.max_body_bytes (the gRPC message limit)",
                grpc_receive_limit(old.server.max_body_bytes)
                != grpc_receive_limit(new.server.max_body_bytes))]
    return [name for name, differs in changed if differs]


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


def parse_listen(listen: str) -> str:
    """'host:port' or 'unix:/path' → a gRPC bind address."""
    if listen.startswith("unix:"):
        return listen if listen.startswith("unix://") else "unix:" + listen[5:]
    return listen


async def serve(config_path: Path, listen_override: str | None = None) -> int:
    snapshot = config_mod.load(config_path)
    holder = ConfigHolder(config_path, snapshot)
    server_cfg = snapshot.server
    listen = parse_listen(listen_override or server_cfg.listen)

    # A large body inspected on the worker thread holds the GIL in slices of this
    # interval; shorter slices keep the other exchanges' added wait small.
    sys.setswitchinterval(0.001)
    server = grpc.aio.server(options=grpc_server_options(server_cfg.max_body_bytes))
    services = Services.start(snapshot)
    processor = ExternalProcessor(holder, services)
    ep_grpc.add_ExternalProcessorServicer_to_server(processor, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if server.add_insecure_port(listen) == 0 and not listen.startswith("unix:"):
        raise OSError(f"cannot listen on {listen}")
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

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGHUP, holder.reload, "SIGHUP")
    watcher = asyncio.create_task(holder.watch())
    expiry = asyncio.create_task(services.run_expiry())
    log_flush = asyncio.create_task(logs.flush_every())

    await stop.wait()
    grace = holder.current.server.grace_period_s
    log.info("draining: NOT_SERVING, %d exchanges in flight, grace %.1fs",
             processor.in_flight, grace)
    # Health first, so checks see NOT_SERVING while in-flight exchanges finish.
    await health_servicer.enter_graceful_shutdown()
    watcher.cancel()
    drained = await processor.drain(grace)
    if not drained:
        log.warning("grace period over: cancelling %d exchanges", processor.in_flight)
    await server.stop(0)
    expiry.cancel()
    log_flush.cancel()
    await services.close()
    log.info("stopped")
    return 0
