"""One PNG per run: metrics, perplexity, cumulative update norms and edit time against the number of edits.

Drawn on a Figure with its own Agg canvas, not through pyplot: no display needed, and importing this
module does not change the user's matplotlib backend.
"""

from __future__ import annotations

from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from rledit.evaluation.report import ordered_metrics
from rledit.evaluation.runner import LifelongResult

PLOT_FILE = "metrics.png"
MARKERS = "osv^DPX*"


def metric_points(result: LifelongResult, name: str) -> tuple[list[int], list[float]]:
    """(edits, value) of a metric of a curve or immediate run: pre-edit at 0 edits, then every measured step."""
    xs, ys = ([0], [result.pre_edit[name]]) if result.pre_edit.get(name) is not None else ([], [])
    measured = [(s.edits, s.metrics[name]) for s in result.per_step if s.metrics.get(name) is not None]
    xs += [x for x, _ in measured]
    ys += [y for _, y in measured]
    return xs, ys


def plot_run(result: LifelongResult, path: Path, title: str) -> Path:
    run_figure(result, title).savefig(path, dpi=110)
    return path


def run_figure(result: LifelongResult, title: str) -> Figure:
    """Metrics (curves over the number of edits; unedited and final side by side for the final protocol),
    perplexity, cumulative update norms and edit time per step."""
    figure = Figure(figsize=(12, 8.5), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(2, 2)
    _plot_metrics(axes[0, 0], result)
    _plot_perplexity(axes[0, 1], result)
    _plot_norms(axes[1, 0], result)
    _plot_seconds(axes[1, 1], result)
    p = result.protocol
    figure.suptitle(f"{title}\n{p.num_steps} steps x {p.edits_per_step} edits, evaluated {p.eval_timing}")
    return figure


def _plot_metrics(ax, result: LifelongResult) -> None:
    rates = [name for name in ordered_metrics(result.metrics) if name != "perplexity"]
    if result.protocol.eval_timing == "final":  # two measurements, not a trajectory: side-by-side bars
        _pre_and_final_bars(ax, result, rates, "metrics (all requests, unedited and final model)")
        ax.set(ylabel="score", ylim=(0, 1.03))
        return
    label = {"immediate": "each batch right after its edit", "curve": "all requests so far"}[
        result.protocol.eval_timing]
    for name, marker in zip(rates, MARKERS, strict=False):  # distinct markers keep coinciding lines visible
        xs, ys = metric_points(result, name)
        ax.plot(xs, ys, marker=marker, markersize=5, linestyle="--" if name.startswith("cf_") else "-",
                label=name)
    ax.set(title=f"metrics ({label})", xlabel="number of edits", ylabel="score", ylim=(-0.03, 1.03))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=3, frameon=False)


def _plot_perplexity(ax, result: LifelongResult) -> None:
    if result.metrics.get("perplexity") is None:
        ax.text(0.5, 0.5, "no held-out text: perplexity not measured", ha="center", va="center")
        ax.set_axis_off()
        return
    if result.protocol.eval_timing == "final":
        _pre_and_final_bars(ax, result, ["perplexity"], "perplexity on held-out text")
        ax.set(ylabel="perplexity")
        return
    xs, ys = metric_points(result, "perplexity")
    ax.plot(xs, ys, marker="o", color="tab:red")
    ax.set(title="perplexity on held-out text", xlabel="number of edits", ylabel="perplexity")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)


def _pre_and_final_bars(ax, result: LifelongResult, names: list[str], title: str) -> None:
    edits = result.per_step[-1].edits
    for offset, (label, values) in zip((-0.2, 0.2), (("unedited", result.pre_edit),
                                                     (f"after {edits} edits", result.metrics)), strict=True):
        heights = [values.get(name) if values.get(name) is not None else 0.0 for name in names]
        bars = ax.bar([i + offset for i in range(len(names))], heights, width=0.4, label=label)
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
    ax.set_title(title)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)


def _plot_norms(ax, result: LifelongResult) -> None:
    edits = [0] + [s.edits for s in result.per_step]  # no edit, no change
    for index, module in enumerate(result.per_step[0].update_norms):
        ax.plot(edits, [0.0] + [s.update_norms[module] for s in result.per_step], color="tab:gray", linewidth=0.8,
                alpha=0.6, label="each edited module" if index == 0 else None)
    ax.plot(edits, [0.0] + [s.total_update_norm for s in result.per_step], color="tab:blue", linewidth=2,
            label="all modules (root of sum of squares)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(title="norm of the cumulative update ||W - W0||_F", xlabel="number of edits", ylabel="Frobenius norm")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def _plot_seconds(ax, result: LifelongResult) -> None:
    steps = [s.step for s in result.per_step]
    ax.plot(steps, [s.edit_seconds for s in result.per_step], marker=".", color="tab:green")
    refused = [s for s in result.per_step if s.refused]
    if refused:
        ax.scatter([s.step for s in refused], [s.edit_seconds for s in refused], color="tab:red", zorder=3,
                   label="refused edit")
        ax.legend(fontsize=8)
    ax.set(title=f"edit time per step (mean {result.edit_seconds_per_step:.3f} s, evaluation excluded)",
           xlabel="edit step", ylabel="seconds", ylim=(0, 1.1 * max(s.edit_seconds for s in result.per_step)))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
