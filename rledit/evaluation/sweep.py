"""Collect the results.json of many runs (a Hydra multirun such as the batch-size sweep) into one table and
one plot: `python -m rledit.evaluation.sweep multirun/2026-12-02/01-00-00 [--out DIR]`.

Runs whose configurations differ only in their seeds (or in where they write, their threads and their
progress saves) are one row: the mean over those edit sequences, with the seeds listed and the spread (sample
standard deviation) of `cf_mean`, the mean of CounterFact efficacy, paraphrase, neighbourhood and agreement
with the unedited model by which issue 14 ranks editors."""

from __future__ import annotations

import argparse
import csv
import json
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from rledit.errors import ConfigError
from rledit.evaluation.plots import MARKERS
from rledit.evaluation.report import RESULTS_FILE, results_options

METRICS = ("efficacy", "generalization", "specificity", "specificity_agreement", "cf_efficacy_score",
           "cf_paraphrase_score", "cf_neighborhood_score", "unedited_cf_neighborhood", "cf_mean",
           "generation_exact_match", "perplexity", "unedited_perplexity", "edit_seconds_per_step", "seconds_per_edit",
           "refused_edits")
CF_MEAN_OF = ("cf_efficacy_score", "cf_paraphrase_score", "cf_neighborhood_score", "specificity_agreement")
COLUMNS = ("editor", "num_steps", "edits_per_step", "num_requests", "seeds", *METRICS, "cf_mean_sd", "run")
PLOTTED = ("efficacy", "generalization", "specificity_agreement", "cf_neighborhood_score")


def collect(root: Path) -> list[dict[str, Any]]:
    """One row per configuration below `root` (its runs' seeds averaged), sorted by editor and batch size."""
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for path in sorted(root.rglob(RESULTS_FILE)):
        document = json.loads(path.read_text())
        options = _without_seeds(results_options(document["config"]))
        groups[json.dumps(options, sort_keys=True)].append(_run_row(document, path))
    if not groups:
        raise ConfigError(f"no {RESULTS_FILE} below {root}")
    rows = [_mean_row(runs) for runs in groups.values()]
    return sorted(rows, key=lambda r: (r["editor"], r["edits_per_step"], r["run"]))


def _run_row(document: dict[str, Any], path: Path) -> dict[str, Any]:
    protocol, timing, metrics = document["protocol"], document["timing"], document["metrics"]
    row = {"editor": document["editor"]["name"], "num_steps": protocol["num_steps"],
           "edits_per_step": protocol["edits_per_step"], "num_requests": protocol["num_requests"],
           "seed": protocol["seed"], **{name: metrics.get(name) for name in METRICS if name in metrics},
           "unedited_cf_neighborhood": document["pre_edit"].get("cf_neighborhood_score"),
           "unedited_perplexity": document["pre_edit"].get("perplexity"),
           "edit_seconds_per_step": timing["edit_seconds_per_step"],
           "seconds_per_edit": timing["edit_seconds_total"] / protocol["num_requests"],
           "refused_edits": document["refused_edits"], "run": str(path.parent)}
    if all(row.get(name) is not None for name in CF_MEAN_OF):
        row["cf_mean"] = statistics.fmean(row[name] for name in CF_MEAN_OF)
    return row


def _mean_row(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The runs of one configuration as one row: each metric's mean over the runs that have it."""
    row = {key: runs[0][key] for key in ("editor", "num_steps", "edits_per_step", "num_requests")}
    row["seeds"] = ",".join(str(seed) for seed in sorted(r["seed"] for r in runs))
    for name in METRICS:
        values = [r[name] for r in runs if r.get(name) is not None]
        row[name] = statistics.fmean(values) if values else None
    cf_means = [r["cf_mean"] for r in runs if r.get("cf_mean") is not None]
    row["cf_mean_sd"] = statistics.stdev(cf_means) if len(cf_means) > 1 else None
    row["run"] = ";".join(r["run"] for r in runs)
    return row


def _without_seeds(config: Any) -> Any:
    """The configuration with every seed and the run folder left out: what makes runs the same row."""
    if isinstance(config, dict):
        return {k: _without_seeds(v) for k, v in config.items() if k not in ("seed", "run_dir")}
    if isinstance(config, list):
        return [_without_seeds(v) for v in config]
    return config


def write_table(rows: list[dict[str, Any]], out: Path) -> tuple[Path, Path]:
    """comparison.csv (every column) and comparison.md (the metrics, 3 decimals)."""
    csv_path, md_path = out / "comparison.csv", out / "comparison.md"
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, COLUMNS)
        writer.writeheader()
        writer.writerows([{k: row.get(k) for k in COLUMNS} for row in rows])
    shown = [c for c in COLUMNS if c != "run" and any(row.get(c) is not None for row in rows)]
    lines = ["| " + " | ".join(shown) + " |", "|" + "---|" * len(shown)]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(c)) for c in shown) + " |")
    md_path.write_text("\n".join(lines) + "\n")
    return csv_path, md_path


def plot_comparison(rows: list[dict[str, Any]], path: Path) -> Path:
    """Each plotted metric against edits per step (log scale), one line per editor."""
    by_editor: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        by_editor[row["editor"]].append(row)
    metrics = [m for m in PLOTTED if any(row.get(m) is not None for row in rows)]
    figure = Figure(figsize=(4.2 * len(metrics), 4), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, len(metrics), squeeze=False)[0]
    for ax, metric in zip(axes, metrics, strict=True):
        for i, (editor, editor_rows) in enumerate(sorted(by_editor.items())):
            points = [(r["edits_per_step"], r[metric]) for r in editor_rows if r.get(metric) is not None]
            ax.plot(*zip(*points), marker=MARKERS[i % len(MARKERS)], label=editor)
        ax.set_xscale("log")
        ax.set_xlabel("edits per step (same total edits)")
        ax.set_title(metric)
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    axes[0].legend()
    total = sorted({r["num_requests"] for r in rows})
    figure.suptitle(f"final-protocol metrics after {', '.join(map(str, total))} edits")
    figure.savefig(path, dpi=110)
    return path


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 100 else f"{value:.1f}"
    return "-" if value is None else str(value)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("root", type=Path, help="folder holding the runs (searched recursively for results.json)")
    parser.add_argument("--out", type=Path, default=None, help="where to write the table and plot (default: root)")
    args = parser.parse_args(argv)
    out = args.out or args.root
    out.mkdir(parents=True, exist_ok=True)
    rows = collect(args.root)
    csv_path, md_path = write_table(rows, out)
    plot = plot_comparison(rows, out / "comparison.png")
    print(md_path.read_text())
    print(f"{len(rows)} configurations: {csv_path}, {md_path}, {plot}")


if __name__ == "__main__":
    main()
