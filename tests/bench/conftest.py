"""The benches run as scripts (`python bench/bench_x.py`), so they import each other as top-level
modules: the tests here do too, with bench/ on the path (as mypy, given bench/*.py, already has it)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
