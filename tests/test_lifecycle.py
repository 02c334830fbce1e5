"""ATP's life beside Envoy: down, reloads, drain, Unix socket, bad config at start."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from atp_extproc import config as config_mod
from atp_extproc.server import grpc_server_options
from atp_extproc.stack import (
    EXAMPLE_CONFIG,
    FRONT_PROXY,
    Stack,
    copy_example,
    grpc_serving,
    render_envoy,
    wait_until,
)
from tests.conftest import Reply, Upstreams, post, start_stack

pytestmark = pytest.mark.integration

CHAT = "/v1/chat/completions"
HELLO = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
def own_stack(tmp_path: Path):
    config = copy_example(tmp_path)
    stack = start_stack(tmp_path, config)
    yield stack
    stack.stop_all()


def test_atp_down_fails_closed(own_stack: Stack) -> None:
    upstreams = Upstreams(own_stack)
    assert post(own_stack, CHAT, HELLO).status == 200
    upstreams.clear()
    assert own_stack.stop("atp") == 0
    for _ in range(5):
        reply = post(own_stack, CHAT, HELLO)
        assert 500 <= reply.status < 600
        error = reply.json()["error"]
        assert (error["type"], error["code"]) == ("gateway_error", "atp_unavailable")
        assert "reached no model" in error["message"]
    assert upstreams.total() == 0


def _aliases(stack: Stack) -> set[str]:
    from tests.conftest import ALICE, http

    reply = http(stack.base_url + "/v1/models", headers={"authorization": f"Bearer {ALICE}"})
    return {m["id"] for m in reply.json()["data"]}


def test_reload_on_file_change_and_sighup_keeps_old_config_when_bad(own_stack: Stack) -> None:
    path = own_stack.config_path
    original = path.read_text()
    assert "turbo" not in _aliases(own_stack)

    # A good edit is picked up from the file alone.
    path.write_text(original.replace("fast: [small]", "fast: [small]\n      turbo: [large]"))
    wait_until(lambda: "turbo" in _aliases(own_stack), "reload on file change", timeout=15)
    reply = post(own_stack, CHAT, {**HELLO, "model": "turbo"})
    assert reply.status == 200 and reply.headers["x-upstream-name"] == "demo_b"

    # A bad edit is refused, named precisely, and the old snapshot keeps serving.
    path.write_text(original.replace("cluster: demo_b", "cluster: 'demo b!'"))
    wait_until(lambda: "config reload rejected" in own_stack.log("atp"), "rejection logged",
               timeout=15)
    log = own_stack.log("atp")
    assert str(path) in log and "models[1].cluster" in log
    assert post(own_stack, CHAT, {**HELLO, "model": "turbo"}).status == 200

    # SIGHUP reloads too: restore the original and signal at once.
    path.write_text(original)
    own_stack.procs["atp"].send_signal(signal.SIGHUP)
    wait_until(lambda: "turbo" not in _aliases(own_stack), "reload on SIGHUP", timeout=15)
    assert post(own_stack, CHAT, {**HELLO, "model": "turbo"}).status == 404


def _slow_request_in_flight(stack: Stack, latency_ms: int
                            ) -> tuple[Upstreams, threading.Thread, list[Reply]]:
    """Start the stack with a slow demo_a and return once a request is waiting on it."""
    stack.start_upstream("demo_a", "--latency-ms", str(latency_ms))
    stack.start_upstream("demo_b")
    stack.start_atp()
    stack.start_envoy()
    upstreams = Upstreams(stack)
    result: list[Reply] = []
    worker = threading.Thread(target=lambda: result.append(post(stack, CHAT, HELLO)))
    worker.start()
    wait_until(lambda: len(upstreams.requests("demo_a")) == 1, "request in flight")
    return upstreams, worker, result


def test_graceful_drain_finishes_in_flight_then_exits_zero(tmp_path: Path) -> None:
    stack = Stack.on_free_ports(workdir=tmp_path)
    try:
        upstreams, worker, result = _slow_request_in_flight(stack, 1500)
        atp = stack.procs["atp"]
        atp.send_signal(signal.SIGTERM)
        target = f"127.0.0.1:{stack.ports['atp']}"
        wait_until(lambda: not grpc_serving(target), "NOT_SERVING", timeout=5)
        assert atp.poll() is None, "ATP exited before its in-flight exchange ended"
        # New requests are refused while draining and never reach a provider.
        late = post(stack, CHAT, {**HELLO, "model": "gpt-4o"})
        assert 500 <= late.status < 600
        assert upstreams.requests("demo_b") == []

        worker.join(10)
        assert result and result[0].status == 200
        assert result[0].json()["choices"][0]["message"]["content"].endswith("hi")
        assert atp.wait(10) == 0
    finally:
        stack.stop_all()


def test_a_drain_delay_keeps_taking_new_exchanges_while_health_says_not_serving(
        tmp_path: Path) -> None:
    # Beside other ATP endpoints, refusing at once failed the exchanges Envoy sent until
    # its health checks saw NOT_SERVING (a quarter of requests for ~3 s).
    config = copy_example(tmp_path, EXAMPLE_CONFIG.read_text().replace(
        "grace_period_s: 10", "grace_period_s: 10\n  drain_delay_s: 3"))
    stack = start_stack(tmp_path, config)
    try:
        atp = stack.procs["atp"]
        atp.send_signal(signal.SIGTERM)
        started = time.monotonic()
        target = f"127.0.0.1:{stack.ports['atp']}"
        wait_until(lambda: not grpc_serving(target), "NOT_SERVING", timeout=5)
        assert post(stack, CHAT, HELLO).status == 200
        assert time.monotonic() - started < 3, "the request came after the delay"
        assert atp.wait(10) == 0
        assert time.monotonic() - started >= 3
        assert "still taking new exchanges for 3.0s" in stack.log("atp")
    finally:
        stack.stop_all()


def test_unix_socket_between_envoy_and_atp(tmp_path: Path) -> None:
    sock = tmp_path / "atp.sock"
    stack = Stack.on_free_ports(workdir=tmp_path)

    def to_socket(doc: dict) -> None:
        atp = next(c for c in doc["static_resources"]["clusters"] if c["name"] == "atp")
        endpoint = atp["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
        endpoint["address"] = {"pipe": {"path": str(sock)}}

    try:
        stack.start_upstream("demo_a")
        stack.start_upstream("demo_b")
        proc = stack.spawn("atp", [sys.executable, "-m", "atp_extproc", "serve", "--config",
                                    str(stack.config_path), "--listen", f"unix:{sock}"])
        wait_until(lambda: grpc_serving(f"unix:{sock}"), "atp on unix socket", proc=proc)
        stack.start_envoy(render_envoy(stack.ports, edit=to_socket))
        reply = post(stack, CHAT, HELLO)
        assert reply.status == 200 and reply.headers["x-upstream-name"] == "demo_a"
    finally:
        stack.stop_all()


def test_invalid_config_stops_startup_naming_file_path_reason(tmp_path: Path) -> None:
    bad = tmp_path / "atp.yaml"
    bad.write_text(EXAMPLE_CONFIG.read_text().replace("input_per_1k: 0.0025",
                                                      "input_per_1k: -1"))
    proc = subprocess.run([sys.executable, "-m", "atp_extproc", "serve", "--config", str(bad)],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2
    assert str(bad) in proc.stderr
    assert "models[1].price.input_per_1k" in proc.stderr
    assert "greater than or equal to 0" in proc.stderr


@pytest.mark.parametrize("envoy_config", [FRONT_PROXY, FRONT_PROXY.with_name("sidecar-uds.yaml")],
                         ids=lambda p: p.name)
def test_envoy_and_atp_size_limits_agree(envoy_config: Path) -> None:
    envoy = yaml.safe_load(envoy_config.read_text())
    listener_limit = envoy["static_resources"]["listeners"][0][
        "per_connection_buffer_limit_bytes"]
    atp_cluster = next(c for c in envoy["static_resources"]["clusters"] if c["name"] == "atp")
    snapshot = config_mod.load(EXAMPLE_CONFIG)
    max_body = snapshot.server.max_body_bytes
    # ATP must see (and refuse with its own 413) every body it does not accept...
    assert listener_limit > max_body
    # ...and gRPC must accept every body Envoy can buffer, or Envoy answers 504.
    assert dict(grpc_server_options())["grpc.max_receive_message_length"] >= 2 * listener_limit
    assert atp_cluster["per_connection_buffer_limit_bytes"] >= listener_limit
    assert config_mod.Server().max_body_bytes == max_body


def test_front_proxy_is_valid_for_envoy() -> None:
    from atp_extproc.stack import envoy_binary

    proc = subprocess.run([envoy_binary(), "--mode", "validate", "-c", str(FRONT_PROXY)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_drain_gives_up_after_grace(tmp_path: Path) -> None:
    config = copy_example(tmp_path, EXAMPLE_CONFIG.read_text().replace(
        "grace_period_s: 10", "grace_period_s: 0.5"))
    stack = Stack.on_free_ports(config_path=config, workdir=tmp_path)
    try:
        _, worker, result = _slow_request_in_flight(stack, 5000)
        started = time.monotonic()
        assert stack.stop("atp") == 0
        assert time.monotonic() - started < 4
        worker.join(10)
        assert result and result[0].status >= 500
        # The model had the request: the client must not read that it reached none.
        message = result[0].json()["error"]["message"]
        assert "the request reached the model" in message, message
    finally:
        stack.stop_all()


def test_policy_files_reload_atomically_and_a_bad_one_keeps_the_old_set(
        own_stack: Stack) -> None:
    policy = own_stack.config_path.parent / "policies" / "limits.yaml"
    original = policy.read_text()
    embed = {"model": "text-embedding-3-small", "input": "x"}
    assert post(own_stack, "/v1/embeddings", embed).status == 200

    # An edit to an included file alone is a reload: now every embedding is refused.
    policy.write_text(original.replace(
        "expression: request.operation == 'embeddings' && request.stream",
        "expression: request.operation == 'embeddings'"))
    wait_until(lambda: post(own_stack, "/v1/embeddings", embed).status == 403,
               "policy reload", timeout=15)

    # A policy that does not type-check is refused with file and line; the set in force
    # stays (embeddings still refused).
    policy.write_text(original.replace("request.operation == 'embeddings' && request.stream",
                                       "request.operaton == 'embeddings'"))
    wait_until(lambda: "operaton" in own_stack.log("atp"), "rejection logged", timeout=15)
    log = own_stack.log("atp")
    assert f"{policy}:" in log and "config reload rejected" in log
    assert post(own_stack, "/v1/embeddings", embed).status == 403


def test_health_list_and_a_drain_with_no_grace_and_nothing_in_flight(tmp_path: Path) -> None:
    """List answers the statuses Check does; with grace 0 and no exchange in flight,
    the drain has nothing to cancel and says nothing about cancelling."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from atp_extproc.server import EXT_PROC_SERVICE

    config = copy_example(tmp_path, EXAMPLE_CONFIG.read_text().replace(
        "grace_period_s: 10", "grace_period_s: 0"))
    stack = Stack.on_free_ports(config_path=config, workdir=tmp_path)
    try:
        stack.start_atp()
        with grpc.insecure_channel(f"127.0.0.1:{stack.ports['atp']}") as channel:
            listed = health_pb2_grpc.HealthStub(channel).List(health_pb2.HealthListRequest(),
                                                              timeout=5)
        serving = health_pb2.HealthCheckResponse.SERVING
        assert {name: s.status for name, s in listed.statuses.items()} == {
            "": serving, EXT_PROC_SERVICE: serving}
        assert stack.stop("atp") == 0
        log = stack.log("atp")
        assert "stopped" in log
        assert "cancelling" not in log and "Traceback" not in log
    finally:
        stack.stop_all()
