"""`python -m bench` (`make bench`): run every scenario once and write BENCHMARKS.md."""

from __future__ import annotations

import sys

from bench.run import main

sys.exit(main())
