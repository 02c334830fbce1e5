"""Running wrk against the local Envoy and reading its result line."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

LUA_SCRIPT = Path(__file__).with_name("chat.lua")
THREADS = 2
_RESULT = re.compile(r"^BENCH_RESULT (.*)$", re.MULTILINE)


@dataclass(frozen=True)
class Load:
    """One wrk run: closed loop when `rate` is None, else paced to `rate` req/s total."""

    name: str
    connections: int
    duration_s: float
    rate: float | None = None

    def label(self) -> str:
        if self.rate is None:
            return f"closed loop, {self.connections} conns"
        return f"paced {self.rate:.0f} req/s, {self.connections} conns"


@dataclass(frozen=True)
class WrkResult:
    requests: int
    duration_s: float
    errors: dict[str, int]
    p50_ms: float
    p95_ms: float
    p99_ms: float

    @property
    def rps(self) -> float:
        return self.requests / self.duration_s

    @property
    def socket_errors(self) -> int:
        return sum(v for k, v in self.errors.items() if k != "status")


def wrk_binary() -> str:
    found = shutil.which("wrk")
    if found is None:
        raise FileNotFoundError("wrk not found: `apt-get install -y wrk` (make bench does)")
    return found


def parse_result(stdout: str) -> WrkResult:
    match = _RESULT.search(stdout)
    if match is None:
        raise RuntimeError(f"wrk printed no BENCH_RESULT line:\n{stdout}")
    fields = dict(pair.split("=", 1) for pair in match.group(1).split())
    us = {k: float(v) for k, v in fields.items()}
    return WrkResult(
        requests=int(us["requests"]),
        duration_s=us["duration_us"] / 1e6,
        errors={k: int(us[k]) for k in ("connect", "read", "write", "status", "timeout")},
        p50_ms=us["p50_us"] / 1000, p95_ms=us["p95_us"] / 1000, p99_ms=us["p99_us"] / 1000,
    )


def run(load: Load, url: str, body_file: Path, api_key: str,
        duration_s: float | None = None) -> WrkResult:
    """Run wrk once; `duration_s` overrides the load's duration (warmups)."""
    if not url.startswith("http://127.0.0.1:"):
        raise ValueError(f"the bench only targets 127.0.0.1, not {url}")
    seconds = duration_s if duration_s is not None else load.duration_s
    env = dict(os.environ, BENCH_BODY_FILE=str(body_file), BENCH_API_KEY=api_key,
               BENCH_THREAD_RATE=str((load.rate or 0) / THREADS))
    argv = [wrk_binary(), f"-t{THREADS}", f"-c{load.connections}", f"-d{seconds:g}s",
            "--timeout", "5s", "-s", str(LUA_SCRIPT), url]
    # wrk stops itself after -d; the subprocess timeout only guards against a hang.
    done = subprocess.run(argv, env=env, capture_output=True, text=True,
                          timeout=seconds + 30, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"wrk exited {done.returncode}:\n{done.stdout}\n{done.stderr}")
    return parse_result(done.stdout)
