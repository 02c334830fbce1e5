"""Fixtures for integration tests: a real Envoy, ATP and fake upstreams on free ports."""

from __future__ import annotations

import json
import logging
import re
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from atp_extproc.stack import Stack

# The least config ATP loads: an anonymous tenant, one model, one route.
MINIMAL_CONFIG = """auth: {anonymous_tenant: anon}
models:
  - {name: m, cluster: c, upstream_model: u, price: {input_per_1k: 0.001, output_per_1k: 0}}
routes:
  - {name: r, aliases: {a: [m]}}
"""

ALICE = "sk-demo-alice"
BOB = "sk-demo-bob"


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self):
        return json.loads(self.body)


def http(url: str, method: str = "GET", body: bytes | None = None,
         headers: dict[str, str] | None = None, timeout: float = 10) -> Reply:
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return Reply(resp.status, {k.lower(): v for k, v in resp.headers.items()},
                         resp.read())
    except urllib.error.HTTPError as err:
        return Reply(err.code, {k.lower(): v for k, v in err.headers.items()}, err.read())


class Upstreams:
    def __init__(self, stack: Stack):
        self.stack = stack

    def requests(self, name: str) -> list[dict]:
        port = self.stack.ports[name]
        return http(f"http://127.0.0.1:{port}/debug/requests").json()["requests"]

    def clear(self) -> None:
        for name in ("demo_a", "demo_b"):
            http(f"http://127.0.0.1:{self.stack.ports[name]}/debug/requests", "DELETE")

    def total(self) -> int:
        return sum(len(self.requests(n)) for n in ("demo_a", "demo_b"))


def post(stack: Stack, path: str, body: bytes | dict, key: str | None = ALICE,
         headers: dict[str, str] | None = None) -> Reply:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    all_headers = {"content-type": "application/json", **(headers or {})}
    if key is not None:
        all_headers["authorization"] = f"Bearer {key}"
    return http(stack.base_url + path, "POST", raw, all_headers)


def start_stack(tmp_path: Path | None = None, config: Path | None = None) -> Stack:
    kwargs = {}
    if config is not None:
        kwargs["config_path"] = config
    stack = Stack.on_free_ports(workdir=tmp_path, **kwargs)
    try:
        stack.start_all()
    except Exception:
        stack.stop_all()
        raise
    return stack


@pytest.fixture(scope="session")
def stack(tmp_path_factory) -> Iterator[Stack]:
    s = start_stack(tmp_path_factory.mktemp("stack"))
    yield s
    s.stop_all()


@pytest.fixture
def upstreams(stack: Stack) -> Upstreams:
    u = Upstreams(stack)
    u.clear()
    return u


_KEYED = re.compile(r"\[([A-Z][A-Z0-9_]*):[0-9a-f]{16}\]")


def numbered(value):
    """`value` (text, or JSON-like) with the Responses API's keyed placeholders
    (`[EMAIL:3f9c...]`) numbered per class in order of appearance, as other requests'
    are (`[EMAIL_1]`): one expectation reads for both."""
    text = value if isinstance(value, str) else json.dumps(value)
    names: dict[str, str] = {}

    def number(m: re.Match) -> str:
        if m.group(0) not in names:
            n = 1 + sum(1 for k in names if k.startswith(f"[{m.group(1)}:"))
            names[m.group(0)] = f"[{m.group(1)}_{n}]"
        return names[m.group(0)]

    out = _KEYED.sub(number, text)
    return out if isinstance(value, str) else json.loads(out)


@pytest.fixture
def keep_root_log_level() -> Iterator[None]:
    """A reload sets the process's log level: put back the test session's."""
    root = logging.getLogger()
    level = root.level
    yield
    root.setLevel(level)
