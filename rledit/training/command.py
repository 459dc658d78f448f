"""What `python train.py` (and `rledit-train`) does with its composed config: train an editor, keep the best."""

from __future__ import annotations

import fnmatch
import math
import os
import warnings
from pathlib import Path

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig, OmegaConf

from rledit.atomic_write import partial_path
from rledit.environment import describe_environment
from rledit.errors import ConfigError
from rledit.pipeline import build_editor, build_experiment, editor_checkpoint, set_up_editor
from rledit.training.module import EditorTrainer, FrozenTarget
from rledit.training.rollout import Objective


def train(cfg: DictConfig) -> Path:
    """Train the configured editor; returns the path of the written editor checkpoint."""
    L.seed_everything(cfg.seed, workers=True)
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)  # a resumed run with nothing left to train saves nothing before editor.ckpt
    experiment = build_experiment(cfg)
    editor = build_editor(cfg, experiment)
    if not editor.trainable:
        raise ConfigError(f"editor={cfg.editor.name} has nothing to train; evaluate it directly: "
                          f"python evaluate.py editor={cfg.editor.name}")
    set_up_editor(cfg, experiment, editor)
    restrict_training(editor, cfg.training.trainable)
    objective: Objective = instantiate(cfg.editor.objective)
    training = cfg.training
    length = objective.sequence_length
    # Built as partials, so that the records, the editor and the model are passed as they are, never copied.
    datamodule = instantiate(cfg.datamodule, _partial_=True)(
        experiment.data.train, experiment.data.eval, experiment.collator, train_num_steps=length,
        eval_num_steps=validation_length(cfg, len(experiment.data.train), len(experiment.data.eval), length),
        sequences_per_epoch=max(1, training.batches_per_epoch // length))
    module = instantiate(cfg.module, _partial_=True)(editor, FrozenTarget(experiment.model, experiment.editable), objective)
    logger = instantiate(cfg.logger) if cfg.logger else False
    if logger:
        logger.log_hyperparams({**OmegaConf.to_container(cfg, resolve=True), "environment": describe_environment()})
    if training.keep not in ("best", "best_epoch", "last"):
        raise ConfigError(f"training.keep={training.keep!r}: expected 'best', 'best_epoch' or 'last'")
    callbacks = {name: instantiate(callback) for name, callback in (cfg.get("callbacks") or {}).items()}
    best = callbacks.get("best")
    if training.keep != "last" and best is None:
        raise ConfigError(f"training.keep={training.keep} needs the `best` checkpoint callback "
                          f"(configs/callbacks/default.yaml)")
    trainer = instantiate(cfg.trainer, default_root_dir=str(run_dir), logger=logger,
                          callbacks=list(callbacks.values()))
    # The training stream is checkpointed with its position (EditStreamDataModule's loader), so resuming
    # from any checkpoint, mid-epoch included, continues exactly where the interrupted run was.
    if cfg.resume is None:  # the curve's first point, and the editor training has to beat
        (scores,) = trainer.validate(module, datamodule=datamodule, verbose=False)
        module.remember_start(scores["val/score"])
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.resume, weights_only=True)
    if training.keep != "last":
        keep_best(module, best, earlier_best(cfg.resume, best), start_competes=training.keep == "best")
    path = run_dir / "editor.ckpt"
    if trainer.is_global_zero:  # written whole then renamed: a kill never leaves a truncated editor.ckpt
        partial = partial_path(path)
        torch.save(editor_checkpoint(editor, cfg), partial)
        os.replace(partial, path)
        print(f"editor checkpoint: {path}")
    close_ranks(trainer)
    return path


def restrict_training(editor: torch.nn.Module, patterns: list[str] | str | None) -> None:
    """Train only the editor's parameters whose names match one of `patterns` (shell-style, as `*log_eta`), to
    learn a few scalars beside a network held where it starts; None trains them all. The optimizer takes only
    parameters that require gradients, so the others keep their values, in checkpoints too."""
    if patterns is None:
        return
    patterns = [patterns] if isinstance(patterns, str) else list(patterns)
    names = [name for name, _ in editor.named_parameters()]
    for pattern in patterns:
        if not any(fnmatch.fnmatchcase(name, pattern) for name in names):
            raise ConfigError(f"training.trainable: {pattern!r} matches none of the editor's parameters: "
                              + ", ".join(names))
    for name, parameter in editor.named_parameters():
        parameter.requires_grad_(any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns))


def close_ranks(trainer: L.Trainer) -> None:
    """Wait for every rank, then destroy the process group Lightning opened: a gloo group still alive when the
    interpreter exits can abort the process (SIGABRT, "terminate called without an active exception")."""
    trainer.strategy.barrier()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def keep_best(module: EditorTrainer, best: ModelCheckpoint, earlier: tuple[float, str] | None = None,
              start_competes: bool = True) -> None:
    """Load the editor of the best validation score into `module`: the best epoch's (this run's, or `earlier`, the
    best a resumed run recorded in another folder), or the starting editor's when no epoch beat it (training that
    only made the editor worse hands back the editor it started from). Without `start_competes` the best epoch is
    kept even then: a baseline is reported as its method trains it, not as the editor it started from."""
    epochs = [earlier] if earlier else []
    if best.best_model_path and best.best_model_score is not None:
        epochs.append((float(best.best_model_score), best.best_model_path))
    trained, path = max(epochs, default=(-math.inf, ""))
    start = module.start if start_competes else None
    if start is not None and start.score > trained:
        module.editor.load_state_dict(start.state)
        print(f"no epoch beat the starting editor's validation score ({start.score:.4f} against {trained:.4f}): "
              f"keeping the starting editor")
    elif path:
        module.load_state_dict(torch.load(path, weights_only=True)["state_dict"])
        print(f"keeping the editor of {path} (validation score {trained:.4f})")


def earlier_best(resume: str | None, best: ModelCheckpoint) -> tuple[float, str] | None:
    """The best epoch (score, checkpoint) of the run `resume` continues, when it continues in another folder:
    Lightning then forgets that epoch's score, and the first epoch of the new folder would count as best."""
    if resume is None:
        return None
    state = torch.load(resume, map_location="cpu", weights_only=True, mmap=True)["callbacks"].get(best.state_key)
    if not state or state.get("best_model_score") is None or Path(state["dirpath"]) == Path(best.dirpath):
        return None
    if not Path(state["best_model_path"]).is_file():
        warnings.warn(f"resume={resume}: its best checkpoint {state['best_model_path']} is gone; choosing among "
                      f"this run's epochs and the starting editor only", stacklevel=2)
        return None
    return float(state["best_model_score"]), state["best_model_path"]


def validation_length(cfg: DictConfig, n_train: int, n_eval: int, sequence_length: int) -> int:
    """Steps of the validation sequence: `training.val_num_steps`, shortened (with a warning) to what the
    held-out records allow. A training sequence longer than the training records allow is a ConfigError."""
    edits = cfg.training.edits_per_step
    if sequence_length * edits > n_train:
        raise ConfigError(f"editor.objective.sequence_length={sequence_length} x training.edits_per_step={edits} "
                          f"= {sequence_length * edits} distinct edits per training sequence, but data="
                          f"{cfg.data.name} has {n_train} training records: lower one of the two")
    steps = min(cfg.training.val_num_steps, n_eval // edits)
    if steps < 1:
        raise ConfigError(f"training.edits_per_step={edits} is more than the {n_eval} held-out records of "
                          f"data={cfg.data.name}")
    if steps < cfg.training.val_num_steps:
        warnings.warn(f"training.val_num_steps={cfg.training.val_num_steps} x training.edits_per_step={edits} "
                      f"needs {cfg.training.val_num_steps * edits} held-out records, data={cfg.data.name} has "
                      f"{n_eval}: validating on {steps} steps", stacklevel=2)
    return steps
