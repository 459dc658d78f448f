"""2,000 sequential edits on the tiny model: memory (the ledger's own growth aside) and step time are flat.

Runs benchmarks/long_run.py as its own process, so that the resident set measured is that of a lifelong run
and not of a test session that has loaded other models before.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))  # the benchmark scripts import their shared `harness` module

from long_run import RSS_LIMIT, TIME_LIMIT


@pytest.mark.slow
def test_two_thousand_edits_keep_memory_and_step_time_flat():
    done = subprocess.run([sys.executable, "benchmarks/long_run.py", "--steps", "100", "--edits", "20"],
                          cwd=REPO, capture_output=True, text=True, timeout=900, check=False)
    assert done.returncode in (0, 1), done.stderr[-3000:]  # 1: a limit was exceeded, checked below
    report = json.loads(done.stdout[done.stdout.index("{"):])
    print(report)
    assert report["refused_edits"] == 0
    assert report["ledger_end_mib"] > report["ledger_after_first_hundred_mib"]  # it keeps every update
    assert report["rss_growth"] <= RSS_LIMIT
    assert abs(report["time_ratio"] - 1) <= TIME_LIMIT
    assert done.returncode == 0 and report["within_limits"]
