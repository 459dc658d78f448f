"""Sending a finished lifelong run to a Lightning experiment logger (W&B, CSV, ...)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import Logger, WandbLogger

from rledit.evaluation.report import ordered_metrics, per_step_table
from rledit.evaluation.runner import LifelongResult, StepRecord


def step_scalars(step: StepRecord) -> dict[str, float]:
    scalars = {"edit/seconds": step.edit_seconds, "edit/refused": float(step.refused),
               "update_norm/total": step.total_update_norm}
    scalars.update({f"update_norm/{module}": norm for module, norm in step.update_norms.items()})
    scalars.update({f"eval/{name}": value for name, value in step.metrics.items() if value is not None})
    return scalars


def summary_scalars(result: LifelongResult) -> dict[str, float]:
    """Final and pre-edit metrics, edit cost and refusals: the numbers a run is compared by."""
    summary = {f"final/{k}": v for k, v in ordered_metrics(result.metrics).items() if v is not None}
    summary.update({f"pre_edit/{k}": v for k, v in ordered_metrics(result.pre_edit).items() if v is not None})
    summary.update({"timing/edit_seconds_per_step": result.edit_seconds_per_step,
                    "timing/edit_seconds_total": result.edit_seconds_total,
                    "timing/peak_memory_bytes": float(result.peak_memory_bytes),
                    "refused_edits": float(result.refused_edits)})
    return summary


def log_run(logger: Logger, result: LifelongResult, plot: Path, config: dict[str, Any]) -> None:
    """Per-step scalars (pre-edit metrics at step 0), then the summary; on W&B also the per-step table,
    the plot and the run summary. Finishes the logger's run, so offline files are complete on return."""
    logger.log_hyperparams(config)
    logger.log_metrics({f"eval/{k}": v for k, v in result.pre_edit.items() if v is not None}, step=0)
    for step in result.per_step:
        logger.log_metrics(step_scalars(step), step=step.step)
    summary = summary_scalars(result)
    if isinstance(logger, WandbLogger):
        columns, rows = per_step_table(result)
        logger.log_table(key="per_step", columns=columns, data=rows)
        logger.log_image(key="plot", images=[str(plot)])
        logger.experiment.summary.update(summary)
    else:
        logger.log_metrics(summary, step=result.protocol.num_steps)
    logger.finalize("success")
    if isinstance(logger, WandbLogger):
        import wandb  # only W&B runs need it (slow to import)

        logger.experiment.finish()
        wandb.teardown()  # finish() may return before the run file is written; teardown waits for it
