"""Turning a composed Hydra config into the objects both entry points use: model, data, editor."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf

from rledit.data.collate import EditCollator
from rledit.data.sources import EditData
from rledit.editors.base import Editor
from rledit.errors import ConfigError
from rledit.models.layers import EditableModule, resolve_edit_modules
from rledit.training.rollout import Objective

EDITOR_CHECKPOINT_FORMAT = "rledit-editor/1"


@dataclass
class Experiment:
    """The frozen model, its tokenizer and edited modules, and the edit requests."""

    loaded: Any
    editable: dict[str, EditableModule]
    data: EditData
    collator: EditCollator

    @property
    def model(self) -> torch.nn.Module:
        return self.loaded.model

    @property
    def module_shapes(self) -> dict[str, tuple[int, int]]:
        return {name: (em.d_out, em.d_in) for name, em in self.editable.items()}


def build_experiment(cfg: DictConfig) -> Experiment:
    loaded = instantiate(cfg.model.load)
    editable = resolve_edit_modules(loaded.model, list(cfg.model.edit_modules))
    data = instantiate(cfg.data.records)(loaded)
    collator = EditCollator(loaded.tokenizer, max_length=cfg.model.get("max_length"))
    return Experiment(loaded, editable, data, collator)


def build_editor(cfg: DictConfig, experiment: Experiment) -> Editor:
    editor = instantiate(cfg.editor.build)(module_shapes=experiment.module_shapes)
    return editor.to(next(experiment.model.parameters()).device)


def build_objective(cfg: DictConfig) -> tuple[Objective, int]:
    """The editor's training objective and the length of its training sequences."""
    options = OmegaConf.to_container(cfg.editor.objective, resolve=True)
    sequence_length = options.pop("sequence_length")
    return Objective(**{**options, "gen_prompts": tuple(options["gen_prompts"])}), sequence_length


def editor_checkpoint(editor: Editor, cfg: DictConfig) -> dict:
    """What `editor.ckpt` holds: how to rebuild the editor, its state, and the config; never the LLM."""
    return {"format": EDITOR_CHECKPOINT_FORMAT,
            "editor_class": f"{type(editor).__module__}.{type(editor).__qualname__}",
            "editor_config": editor.config(),
            "state_dict": {k: v.detach().cpu() for k, v in editor.state_dict().items()},
            "model": cfg.model.name,
            "edit_modules": list(cfg.model.edit_modules),
            "config": OmegaConf.to_container(cfg, resolve=True)}


def load_editor_checkpoint(path: str, experiment: Experiment) -> tuple[Editor, dict]:
    """Rebuild an editor from `editor.ckpt` (loaded with weights_only=True) and check it fits the model."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as exc:
        raise ConfigError(f"checkpoint={path}: no such file (train one with `python train.py`)") from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != EDITOR_CHECKPOINT_FORMAT:
        raise ConfigError(f"checkpoint={path} is not an rledit editor checkpoint")
    saved = {name: tuple(shape) for name, shape in ckpt["editor_config"]["module_shapes"].items()}
    if saved != experiment.module_shapes:
        raise ConfigError(f"checkpoint={path} was trained for modules {saved} of model {ckpt['model']!r}, but "
                          f"this model's edited modules are {experiment.module_shapes}")
    editor_class = ckpt["editor_class"]
    if not editor_class.startswith("rledit.editors.") or not issubclass(get_class(editor_class), Editor):
        raise ConfigError(f"checkpoint={path} names editor class {editor_class!r}, which is not an rledit editor")
    options = dict(ckpt["editor_config"])
    shapes = {name: tuple(shape) for name, shape in options.pop("module_shapes").items()}
    editor = get_class(editor_class)(shapes, **options)
    editor.load_state_dict(ckpt["state_dict"])
    return editor.to(next(experiment.model.parameters()).device), ckpt


@contextmanager
def cpu_threads(count: int | None) -> Iterator[None]:
    """torch's CPU thread count set to `count` inside the block (untouched when None), restored after.

    Small models lose to threading overhead on a busy CPU: model=tiny edits 10x faster on one thread
    than on two when other processes share the cores (measured on a shared 2-core machine).
    """
    previous = torch.get_num_threads()
    if count:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
