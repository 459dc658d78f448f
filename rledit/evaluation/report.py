"""What a lifelong run leaves behind: results.json, per_step.csv, and the table printed at the end."""

from __future__ import annotations

import csv
import json
import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

from rledit.environment import describe_environment
from rledit.evaluation.metrics import METRIC_DEFINITIONS
from rledit.evaluation.runner import LifelongResult

RESULTS_FILE = "results.json"
PER_STEP_FILE = "per_step.csv"


# Options that change where a run writes, what it logs or how often it saves, not what it measures (threads
# can move the last digits, which results.json records as its environment).
OPTIONS_THAT_KEEP_RESULTS = ("run_dir", "cpu_threads", "logger", "save_edited", "progress_every", "paths")


def results_options(config: dict[str, Any]) -> dict[str, Any]:
    """A run's resolved config less OPTIONS_THAT_KEEP_RESULTS: what two runs must share to be the same run."""
    return {key: value for key, value in config.items() if key not in OPTIONS_THAT_KEEP_RESULTS}


def ordered_metrics(values: dict[str, float | None]) -> dict[str, float | None]:
    """Metrics in the order of METRIC_DEFINITIONS (the order of the table and the plot)."""
    return {name: values[name] for name in METRIC_DEFINITIONS if name in values}


def results_document(result: LifelongResult, *, skipped_records: int, editor: dict[str, Any],
                     config: dict[str, Any]) -> dict[str, Any]:
    """The content of results.json; non-finite numbers (a collapsed model's norms) become null."""
    metrics = ordered_metrics(result.metrics)
    return _finite_or_none({
        "metrics": metrics,
        "pre_edit": ordered_metrics(result.pre_edit),
        "protocol": {**asdict(result.protocol), "num_requests": result.num_requests},
        "per_step": [step.as_dict() for step in result.per_step],
        "timing": {"edit_seconds_per_step": result.edit_seconds_per_step,
                   "edit_seconds_total": result.edit_seconds_total,
                   "peak_memory_bytes": result.peak_memory_bytes,
                   "peak_memory_source": result.peak_memory_source},
        "refused_edits": result.refused_edits,
        "skipped_records": skipped_records,
        "metric_definitions": {name: METRIC_DEFINITIONS[name] for name in metrics},
        "editor": editor,
        "config": config,
        "environment": describe_environment(),
    })


def write_results(document: dict[str, Any], run_dir: Path) -> Path:
    path = run_dir / RESULTS_FILE
    path.write_text(json.dumps(document, indent=2, allow_nan=False))
    return path


def per_step_table(result: LifelongResult) -> tuple[list[str], list[list]]:
    """(columns, rows), one row per edit step: cost, refusal, cumulative update norms, any metrics (None if unmeasured)."""
    modules = list(result.per_step[0].update_norms)
    metric_names = [name for name in METRIC_DEFINITIONS if any(name in s.metrics for s in result.per_step)]
    columns = ["step", "edits", "edit_seconds", "refused", "total_update_norm",
               *[f"update_norm/{m}" for m in modules], *metric_names]
    rows = [[s.step, s.edits, s.edit_seconds, int(s.refused), s.total_update_norm,
             *[s.update_norms[m] for m in modules], *[s.metrics.get(name) for name in metric_names]]
            for s in result.per_step]
    return columns, rows


def write_per_step_csv(result: LifelongResult, run_dir: Path) -> Path:
    columns, rows = per_step_table(result)
    path = run_dir / PER_STEP_FILE
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        writer.writerows([["" if v is None else v for v in row] for row in rows])
    return path


def format_table(result: LifelongResult, skipped_records: int) -> str:
    """The summary printed at the end of a run: each metric before and after the edits, then the costs."""
    p = result.protocol
    lines = [f"{p.num_steps} steps x {p.edits_per_step} edits = {result.num_requests} requests, "
             f"evaluated {p.eval_timing}" + (f" (every {p.curve_every} steps)" if p.eval_timing == "curve" else ""),
             f"{'metric':<24}{'pre-edit':>10}{'edited':>10}"]
    pre = result.pre_edit
    for name, value in ordered_metrics(result.metrics).items():
        lines.append(f"{name:<24}{_cell(pre.get(name)):>10}{_cell(value):>10}")
    lines.append(f"edit time: {result.edit_seconds_per_step:.4f} s per step, {result.edit_seconds_total:.3f} s "
                 f"in all (evaluation excluded)")
    lines.append(f"peak memory: {result.peak_memory_bytes / 2**20:.1f} MiB ({result.peak_memory_source})")
    lines.append(f"refused edits: {result.refused_edits}; skipped records: {skipped_records}")
    return "\n".join(lines)


def _cell(value: float | None) -> str:
    if value is None:
        return "-"
    if abs(value) >= 1e5:  # a destroyed model's perplexity: keep it inside its 10-character column
        return f"{value:.3e}"
    return f"{value:.2f}" if abs(value) >= 10 else f"{value:.4f}"


def _finite_or_none(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite_or_none(v) for v in value]
    return value
