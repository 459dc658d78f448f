"""What `python evaluate.py` does with its composed config: edit, measure, write, plot, log, keep."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from rledit.data.collate import TokenizedBatch
from rledit.editors.base import Editor
from rledit.errors import ConfigError
from rledit.evaluation.plots import PLOT_FILE, plot_run
from rledit.evaluation.progress import RunProgress
from rledit.evaluation.report import (
    format_table,
    results_document,
    results_options,
    write_per_step_csv,
    write_results,
)
from rledit.evaluation.runner import Protocol, run_lifelong
from rledit.evaluation.saved_edits import save_edited_model
from rledit.evaluation.scoring import RequestScorer, text_rows
from rledit.evaluation.tracking import log_run
from rledit.models.layers import resolve_edit_modules
from rledit.pipeline import (
    Experiment,
    build_editor,
    build_experiment,
    checkpoint_editor_class,
    checkpoint_experiment,
    edited_module_specs,
    require_subjects,
    set_up_editor,
)
from rledit.session import EditSession
from rledit.threads import cpu_threads

PROGRESS_FOLDER = "progress"

HOW_TO_EVALUATE_A_TRAINED_EDITOR = (
    "To evaluate a trained RLEdit editor instead: run `python train.py` (it saves editor.ckpt in its run "
    "folder), then `python evaluate.py checkpoint=<that run folder>/editor.ckpt`.")


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Run the configured lifelong protocol and write results.json, per_step.csv and the plot to cfg.run_dir."""
    with cpu_threads(cfg.cpu_threads):
        return _evaluate(cfg)


def _evaluate(cfg: DictConfig) -> dict[str, Any]:
    protocol: Protocol = instantiate(cfg.protocol, num_steps=_num_steps(cfg))
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    if cfg.checkpoint:
        experiment, editor, ckpt = checkpoint_experiment(cfg, cfg.checkpoint)
        editor_info = _checkpoint_editor_info(cfg, experiment, ckpt)
    else:
        if cfg.get("checkpoint_options"):
            raise ConfigError(f"checkpoint_options={dict(cfg.checkpoint_options)} replace a checkpoint's build "
                              "options, but no checkpoint is given (set the editor's with editor.build.X=...)")
        experiment = build_experiment(cfg)
        editor, editor_info = _configured_editor(cfg, experiment)
    require_subjects(experiment.data.eval, editor)
    set_up_editor(cfg, experiment, editor)
    editor_info.update(editor.report())
    session = EditSession(experiment.model, experiment.editable, editor)
    scorer = RequestScorer(experiment.model, protocol.eval_batch_size, experiment.collator,
                           probability_comparison=cfg.metrics.probability_comparison,
                           generation=cfg.metrics.generation)
    config = OmegaConf.to_container(cfg, resolve=True)
    progress = None if cfg.get("progress_every") is None else \
        RunProgress(run_dir / PROGRESS_FOLDER, cfg.progress_every, results_options(config))
    result = run_lifelong(session, experiment.collator, experiment.data.eval, protocol,
                          heldout=heldout_rows(cfg, experiment), scorer=scorer, progress=progress)

    document = results_document(result, skipped_records=experiment.data.skipped, editor=editor_info, config=config)
    write_results(document, run_dir)
    write_per_step_csv(result, run_dir)
    plot = plot_run(result, run_dir / PLOT_FILE, title=f"{editor_info['name']} on {cfg.model.name} / {cfg.data.name}")
    if cfg.logger:
        log_run(instantiate(cfg.logger), result, plot, config)
    if cfg.save_edited:
        saved = save_edited_model(session, experiment.loaded.tokenizer, cfg.save_edited)
        print(f"edited model, tokenizer and edits saved to {saved} "
              "(undo with rledit.evaluation.saved_edits.revert_saved_edits)")
    if progress is not None:
        progress.finish()
    print(format_table(result, experiment.data.skipped))
    print(f"results: {run_dir / 'results.json'}, {run_dir / 'per_step.csv'}, {plot}")
    return document


def _num_steps(cfg: DictConfig) -> int:
    """num_steps, or total_edits / edits_per_step when total_edits is set (a sweep over batch sizes)."""
    total = cfg.get("total_edits")
    if total is None:
        return cfg.num_steps
    if total % cfg.edits_per_step:
        raise ConfigError(f"total_edits={total} is not a multiple of edits_per_step={cfg.edits_per_step}")
    return total // cfg.edits_per_step


def _checkpoint_editor_info(cfg: DictConfig, experiment: Experiment, ckpt: dict) -> dict[str, Any]:
    """What results.json says of a checkpoint's editor (it edits the modules it was trained for)."""
    editor_class = checkpoint_editor_class(ckpt)
    print(f"evaluating the editor of checkpoint {cfg.checkpoint} ({editor_class})")
    configured = set(resolve_edit_modules(experiment.model, edited_module_specs(cfg)))
    if configured != set(experiment.editable):
        print(f"the checkpoint edits the modules it was trained for, {sorted(experiment.editable)}, "
              f"not this model config's {sorted(configured)}")
    return {"name": ckpt["config"]["editor"].get("name", editor_class), "class": editor_class,
            "checkpoint": str(cfg.checkpoint),
            **({"checkpoint_options": dict(cfg.checkpoint_options)} if cfg.get("checkpoint_options") else {})}


def _configured_editor(cfg: DictConfig, experiment: Experiment) -> tuple[Editor, dict[str, Any]]:
    """The configured editor as built, saying what that means."""
    editor = build_editor(cfg, experiment)
    if editor.trainable:
        print(f"No checkpoint given: evaluating editor={cfg.editor.name} UNTRAINED, at its initialization. "
              + HOW_TO_EVALUATE_A_TRAINED_EDITOR)
    else:
        print(f"No checkpoint given: evaluating the {cfg.editor.name} editor, which needs no training. "
              + HOW_TO_EVALUATE_A_TRAINED_EDITOR)
    return editor, {"name": cfg.editor.name, "class": f"{type(editor).__module__}.{type(editor).__qualname__}",
                    "checkpoint": None}


def heldout_rows(cfg: DictConfig, experiment: Experiment) -> TokenizedBatch | None:
    """Held-out text for perplexity: the file `heldout_text_file` (one text per line), else the data's own;
    the first `heldout_text_limit` texts when set (a whole WikiText-2 split costs two long passes per run on a CPU)."""
    if cfg.heldout_text_file:
        path = Path(cfg.heldout_text_file)
        if not path.is_file():
            raise ConfigError(f"heldout_text_file={path}: no such file")
        texts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not texts:
            raise ConfigError(f"heldout_text_file={path} holds no text")
    elif experiment.data.heldout_text:
        texts = experiment.data.heldout_text
    else:
        print("no held-out text for perplexity: pass heldout_text_file=PATH (one text per line) to measure it")
        return None
    limit = cfg.get("heldout_text_limit")
    if limit is not None:
        if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
            raise ConfigError(f"heldout_text_limit={limit!r}: must be a positive number of texts, or null for all")
        texts = texts[:limit]
    return text_rows(experiment.loaded.tokenizer, texts, experiment.collator.max_length)
