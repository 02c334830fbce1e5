"""A do-nothing ext_proc server: the floor that ATP is measured against.

It runs on the same stack as ATP (grpc.aio, uvloop, the same server options) and answers
every message with the smallest valid response for its phase. The only thing it does is
tag the request for routing in the request_body answer, so the shipped front-proxy config
(which routes by x-atp-cluster) works unchanged. With --read-response-body it also asks
for the response body, as ATP does for a JSON answer: ATP's four messages per request,
none of ATP's work. With --rewrite it is the least a gateway on this stack does: ATP's
four messages, the body parsed and its model rewritten (the new body and its
content-length in the answer), and the answer's usage read; nothing else of ATP's.

    python -m bench.noop_extproc --listen 127.0.0.1:50051 --cluster demo_a
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
from collections.abc import AsyncIterator

import grpc
import uvloop
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ep_grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from atp_extproc import envoy_api
from atp_extproc.envoy_api import ProcessingMode, body_mode
from atp_extproc.server import EXT_PROC_SERVICE, grpc_server_options


def routing_body_response(cluster: str) -> ep.ProcessingResponse:
    """request_body answer: set x-atp-cluster and clear the route cache.

    Envoy ignores clear_route_cache unless the same response mutates a header, and a
    header set through `value` instead of `raw_value` arrives empty (then 503).
    """
    header = base_pb2.HeaderValueOption(
        header=base_pb2.HeaderValue(key="x-atp-cluster", raw_value=cluster.encode()),
        append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
    )
    common = ep.CommonResponse(clear_route_cache=True)
    common.header_mutation.set_headers.append(header)
    return ep.ProcessingResponse(request_body=ep.BodyResponse(response=common))


def answers(cluster: str, read_response_body: bool = False
            ) -> dict[str, ep.ProcessingResponse]:
    """One prebuilt response per phase, so the per-message cost is gRPC's alone."""
    response_headers = ep.ProcessingResponse(response_headers=ep.HeadersResponse())
    if read_response_body:
        response_headers.mode_override.CopyFrom(body_mode(ProcessingMode.BUFFERED))
    return {
        "request_headers": ep.ProcessingResponse(request_headers=ep.HeadersResponse()),
        "request_body": routing_body_response(cluster),
        "request_trailers": ep.ProcessingResponse(request_trailers=ep.TrailersResponse()),
        "response_headers": response_headers,
        "response_body": ep.ProcessingResponse(response_body=ep.BodyResponse()),
        "response_trailers": ep.ProcessingResponse(response_trailers=ep.TrailersResponse()),
    }


# Longer than the bench body's model: the new body needs a new content-length, as ATP's.
_REWRITTEN_MODEL = "demo-model-rewritten"


def rewrite_answer(body: bytes, cluster: str) -> ep.ProcessingResponse:
    doc = json.loads(body)
    doc["model"] = _REWRITTEN_MODEL
    return envoy_api.request_body({"x-atp-cluster": cluster},
                                  json.dumps(doc, separators=(",", ":")).encode())


class NoopProcessor(ep_grpc.ExternalProcessorServicer):
    def __init__(self, cluster: str, read_response_body: bool = False,
                 rewrite: bool = False) -> None:
        self._cluster = cluster
        self._rewrite = rewrite
        self._answers = answers(cluster, read_response_body or rewrite)

    async def Process(  # gRPC method name
        self, request_iterator: AsyncIterator[ep.ProcessingRequest], context
    ) -> AsyncIterator[ep.ProcessingResponse]:
        async for message in request_iterator:
            # Envoy never reads answers to observability-mode messages (same as ATP).
            if message.observability_mode:
                continue
            phase = message.WhichOneof("request")
            if self._rewrite and phase == "request_body":
                yield rewrite_answer(message.request_body.body, self._cluster)
                continue
            if self._rewrite and phase == "response_body":
                # Read as a gateway reads it to price the request; the figure goes nowhere.
                json.loads(message.response_body.body).get("usage")
            yield self._answers[phase]


async def serve(listen: str, cluster: str, read_response_body: bool = False,
                rewrite: bool = False) -> int:
    server = grpc.aio.server(options=grpc_server_options())
    ep_grpc.add_ExternalProcessorServicer_to_server(
        NoopProcessor(cluster, read_response_body, rewrite), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if server.add_insecure_port(listen) == 0:
        raise OSError(f"cannot listen on {listen}")
    await server.start()
    # Envoy's active health check asks for the ext_proc service by name.
    for service in ("", EXT_PROC_SERVICE):
        await health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    await stop.wait()
    await server.stop(1.0)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", required=True, help="host:port")
    parser.add_argument("--cluster", default="demo_a", help="value for x-atp-cluster")
    parser.add_argument("--read-response-body", action="store_true",
                        help="ask for the response body (BUFFERED), as ATP does for JSON")
    parser.add_argument("--rewrite", action="store_true",
                        help="also rewrite the body's model and read the answer's usage "
                             "(implies --read-response-body)")
    args = parser.parse_args(argv)
    return uvloop.run(serve(args.listen, args.cluster, args.read_response_body,
                            args.rewrite))


if __name__ == "__main__":
    raise SystemExit(main())
