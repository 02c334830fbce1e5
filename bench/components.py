"""In-process figures for the parts of one exchange: redaction, policies, routing.

Each part's own benchmark (atp_extproc.{redact,policy,routing}.bench) runs here, and one
full exchange on the ~1 KB bench body is timed through all four ext_proc phases with the
example config, so each part can be stated as a share of ATP's own per-request time.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from typing import Any

import yaml
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep

from atp_extproc import config, logs
from atp_extproc.exchange import Exchange
from atp_extproc.policy import bench as policy_bench
from atp_extproc.redact import bench as redact_bench
from atp_extproc.routing import bench as routing_bench
from atp_extproc.stack import EXAMPLE_CONFIG, FRONT_PROXY
from bench.envoy_configs import EXT_PROC, _filter, _hcm

_EXCHANGES = 5000


def _headers(values: dict[str, str]) -> base_pb2.HeaderMap:
    return base_pb2.HeaderMap(headers=[base_pb2.HeaderValue(key=k, raw_value=v.encode())
                                       for k, v in values.items()])


def _messages(body: bytes) -> list[ep.ProcessingRequest]:
    reply = json.dumps({
        "id": "x", "object": "chat.completion",
        "choices": [{"index": 0, "finish_reason": "stop",
                     "message": {"role": "assistant", "content": "fine " * 40}}],
        "usage": {"prompt_tokens": 260, "completion_tokens": 50, "total_tokens": 310}})
    return [
        ep.ProcessingRequest(request_headers=ep.HttpHeaders(headers=_headers({
            ":method": "POST", ":path": "/v1/chat/completions", ":authority": "bench",
            "authorization": "Bearer sk-demo-alice", "content-type": "application/json",
            "x-request-id": "0b7c6f0e-1c1a-4e57-9b8f-0b7c6f0e1c1a",
            "content-length": str(len(body))}))),
        ep.ProcessingRequest(request_body=ep.HttpBody(body=body, end_of_stream=True)),
        ep.ProcessingRequest(response_headers=ep.HttpHeaders(headers=_headers({
            ":status": "200", "content-type": "application/json"}))),
        ep.ProcessingRequest(response_body=ep.HttpBody(body=reply.encode(),
                                                       end_of_stream=True)),
    ]


def exchange_us(body: bytes) -> dict[str, float]:
    """Per-request µs of ATP's own work (no gRPC): all four phases and the log line."""
    snapshot = config.load(EXAMPLE_CONFIG)
    messages = _messages(body)
    samples = []
    with open(os.devnull, "wb", buffering=1 << 16) as sink, \
            logs.redirected(snapshot.server.log_level, sink):
        for i in range(_EXCHANGES + 500):
            t0 = time.perf_counter()
            exchange = Exchange(snapshot)
            for message in messages:
                response = exchange.handle(message)
                assert response is not None and not response.HasField("immediate_response")
                response.SerializeToString()
            exchange.finish()
            if i >= 500:
                samples.append((time.perf_counter() - t0) * 1e6)
    samples.sort()
    return {"p50_us": statistics.median(samples),
            "p99_us": samples[int(len(samples) * 0.99) - 1],
            "policies": len(snapshot.policies.policies) if snapshot.policies else 0}


def worst_body() -> dict[str, Any]:
    """Seconds ATP takes on the slowest body it takes in (max_body_bytes of e-mail
    addresses, each one a redaction, as one text and as many text parts, which are read
    joined and each on its own), against Envoy's message_timeout: past it the client gets
    Envoy's 504 instead of ATP's answer. Big bodies queue for one worker thread, so the
    bar asks for room for three at once."""
    snapshot = config.load(EXAMPLE_CONFIG)
    limit = snapshot.server.max_body_bytes
    addresses = [f"user{i:07d}@example.com" for i in range((limit - 100) // 24)]
    parts = [{"type": "text", "text": " ".join(addresses[i:i + 64]) + " "}
             for i in range(0, len(addresses), 64)]
    shapes = {"one text": " ".join(addresses), "text parts of 64": parts}
    slowest: dict[str, Any] = {}
    for shape, content in shapes.items():
        doc = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": content}]}
        body = json.dumps(doc).encode()
        while len(body) > limit:  # the parts' JSON is longer: drop parts to fit
            parts.pop()
            body = json.dumps(doc).encode()
        headers, message = _messages(body)[:2]
        took = []
        for _ in range(3):
            exchange = Exchange(snapshot)
            exchange.handle(headers)
            t0 = time.perf_counter()
            exchange.handle(message)
            took.append(time.perf_counter() - t0)
        if not slowest or max(took) > slowest["max_s"]:
            slowest = {"shape": shape, "bytes": len(body),
                       "median_s": statistics.median(took), "max_s": max(took)}
    envoy = yaml.safe_load(FRONT_PROXY.read_text())
    timeout = _filter(_hcm(envoy), EXT_PROC)["typed_config"]["message_timeout"]
    return {**slowest, "message_timeout_s": float(timeout.rstrip("s"))}


def run(body: bytes) -> dict[str, Any]:
    return {"exchange": exchange_us(body), "redaction": redact_bench.run(),
            "policy": policy_bench.run(), "routing": routing_bench.run(),
            "worst_body": worst_body()}


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def markdown(figures: dict[str, Any], atp_cpu_us: float | None) -> str:
    ex, red, pol, rou, worst = (figures[k] for k in ("exchange", "redaction", "policy",
                                                      "routing", "worst_body"))
    total = ex["p50_us"]

    def share(us: float) -> str:
        out = f"{us / total:.0%} of ATP's in-process exchange"
        if atp_cpu_us:
            out += f", {us / atp_cpu_us:.0%} of ATP's CPU per request under load"
        return out

    # The part benches own their bars: a bar changed there is judged by here too.
    per_kib_bar = red["limits"]["p99_us_per_kib"]
    per_kib_ok = all(red[f"chat_{kib}k_p99_us_per_kib"] <= per_kib_bar for kib in (1, 4, 32))
    big_bar = red["limits"]["chat_1m_p50_ms"]
    lines = [
        "## Parts of an exchange (in process)",
        "",
        f"One exchange with `examples/atp.yaml` (redaction on, {ex['policies']} policies) through "
        "all four phases on the bench body, without gRPC: "
        f"**{ex['p50_us']:.0f} µs p50, {ex['p99_us']:.0f} µs p99**.",
        "",
        "| part | p50 | p99 | share (p50) |",
        "|---|---:|---:|---|",
        f"| redaction, 1 KiB chat body | {red['chat_1k_p50_us']:.0f} µs | "
        f"{red['chat_1k_p99_us']:.0f} µs | {share(red['chat_1k_p50_us'])} |",
        f"| policies ({pol['policies']}, attributes + evaluation + records) | "
        f"{pol['p50_us']:.0f} µs | {pol['p99_us']:.0f} µs | {share(pol['p50_us'])} |",
        f"| routing decision, {rou['candidates']} candidates | {rou['decision_us_p50']:.1f} µs"
        f" | {rou['decision_us_p99']:.1f} µs | - |",
        "",
        "Redaction speed by body size (µs per KiB scanned): "
        f"4 KiB {red['chat_4k_p50_us_per_kib']:.0f} p50 / {red['chat_4k_p99_us_per_kib']:.0f}"
        f" p99, 32 KiB {red['chat_32k_p50_us_per_kib']:.0f} / "
        f"{red['chat_32k_p99_us_per_kib']:.0f}; a 1 MiB body {red['chat_1m_p50_ms']:.1f} ms "
        f"median ({red['chat_1m_max_ms']:.1f} ms max of 10).",
        "",
        f"    {_verdict(per_kib_ok)}  redaction <= {per_kib_bar / 1000:g} ms p99 per KiB "
        "(1-32 KiB)",
        f"    {_verdict(red['chat_1m_p50_ms'] < big_bar)}  redaction of a 1 MiB body "
        f"< {big_bar:g} ms",
        f"    {_verdict(pol['ok'])}  policies <= {pol['bar_p99_us']:g} µs p99 per request "
        f"({pol['p99_us']:.0f} µs)",
        f"    {_verdict(rou['decision_us_p99'] <= 50)}  routing decision <= 50 µs p99 "
        f"for 10 candidates ({rou['decision_us_p99']:.1f} µs)",
        "",
        f"The slowest body ATP takes in ({worst['bytes']:,} bytes of e-mail addresses, "
        f"{worst['shape']}) takes "
        f"{worst['median_s']:.2f} s to inspect (median of 3, max {worst['max_s']:.2f} s); "
        f"Envoy's `message_timeout` is {worst['message_timeout_s']:g} s.",
        "",
        f"    {_verdict(3 * worst['max_s'] < worst['message_timeout_s'])}  three slowest "
        "bodies at once fit in message_timeout",
        "",
    ]
    return "\n".join(lines)
