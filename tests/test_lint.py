"""`make lint` as part of the suite: .ci/run runs `make test` alone, and a lint error
landed unnoticed there."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_code_passes_ruff() -> None:
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "atp_extproc", "tests",
                             "bench"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
