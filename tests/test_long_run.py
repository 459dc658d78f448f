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

from long_run import RSS_LIMIT, TIME_LIMIT, LongRunReport


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
    assert LongRunReport(**{k: v for k, v in report.items() if k != "within_limits"}).time_is_flat, \
        f"step time grew by more than {TIME_LIMIT:.0%} by both ratios"
    assert done.returncode == 0 and report["within_limits"]


def test_step_time_counts_as_flat_only_if_one_ratio_is_within_the_limit():
    def report(referenced: float, cpu: float) -> LongRunReport:
        return LongRunReport(steps=10, edits_per_step=20, refused_edits=0, rss_after_first_hundred_mib=1.0,
                             rss_end_mib=1.0, ledger_after_first_hundred_mib=0.0, ledger_end_mib=0.0, key_memory_end_mib=0.0,
                             rss_growth=0.0, first_hundred_step_cpu_seconds=1.0, last_hundred_step_cpu_seconds=1.0,
                             time_ratio=referenced, cpu_time_ratio=cpu, wall_time_ratio=cpu)
    assert report(1 + 1.5 * TIME_LIMIT, 0.97).time_is_flat
    assert report(0.98, 1 + 1.5 * TIME_LIMIT).time_is_flat
    assert not report(1 + 1.5 * TIME_LIMIT, 1 + 1.2 * TIME_LIMIT).within_limits
