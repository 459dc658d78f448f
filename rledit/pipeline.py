"""Turning a composed Hydra config into the objects both entry points use: model, data, editor."""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from typing import Any

import torch
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf

from rledit.data.collate import EditCollator
from rledit.data.sources import EditData
from rledit.editors.base import EditContext, Editor
from rledit.errors import ConfigError, DataError, LayerSpecError, RleditError
from rledit.models.layers import EditableModule, resolve_edit_modules

EDITOR_CHECKPOINT_FORMAT = "rledit-editor/3"
CALIBRATION_FREE_FORMAT = "rledit-editor/2"  # read too: as format 3 without the calibrated step sizes and ridges


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
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def module_shapes(self) -> dict[str, tuple[int, int]]:
        return {name: (em.d_out, em.d_in) for name, em in self.editable.items()}


def build_experiment(cfg: DictConfig, module_specs: list[str] | None = None) -> Experiment:
    """The experiment of `cfg`, editing `module_specs` when given (a checkpoint's modules), else the
    configured editor's (`edited_module_specs`)."""
    loaded = instantiate(cfg.model.load)
    editable = resolve_edit_modules(loaded.model, module_specs or edited_module_specs(cfg))
    max_length = row_length_limit(cfg.model.get("max_length"), loaded.model)
    collator = EditCollator(loaded.tokenizer, max_length=max_length)
    data = instantiate(cfg.data.records)(loaded, collator)
    return Experiment(loaded, editable, data, collator)


def edited_module_specs(cfg: DictConfig) -> list[str]:
    """The model's layers for the configured editor: `model.locate_modules` (MLP output projections read at
    the subject) for the locate-then-edit family, `model.edit_modules` for the others."""
    if cfg.get("editor") is not None and cfg.editor.get("modules") == "locate":
        if cfg.model.get("locate_modules") is None:
            raise ConfigError(f"editor={cfg.editor.name} edits model.locate_modules, which model={cfg.model.name} "
                              "does not set (give model.locate_modules='[\"model.layers.{3-7}.mlp.down_proj\"]')")
        return list(cfg.model.locate_modules)
    return list(cfg.model.edit_modules)


def require_subjects(records, editor: Editor) -> None:
    """Refuse, before any edit, records whose prompt does not contain their subject when `editor` needs it."""
    if not editor.needs_subject:
        return
    for index, record in enumerate(records):
        if not record.subject or record.subject not in record.prompt:
            raise DataError(f"{type(editor).__name__} reads keys at the subject's last token, but the subject "
                            f"{record.subject!r} of record {record.record_id!r} is not in its prompt "
                            f"{record.prompt!r}", index=index, field="subject")


def row_length_limit(max_length: int | None, model: torch.nn.Module) -> int | None:
    """The longest prompt + target row to allow: model.max_length, never more than the model's context.

    Without this bound a too-long record would fail deep inside the model (or silently run past the
    positions it was trained on) in the middle of a run instead of being refused when the data is loaded.
    """
    context = getattr(model.config, "max_position_embeddings", None)
    if max_length is not None and context is not None and max_length > context:
        raise ConfigError(f"model.max_length={max_length} is longer than the model's context "
                          f"(max_position_embeddings={context})")
    return max_length if max_length is not None else context


def build_editor(cfg: DictConfig, experiment: Experiment) -> Editor:
    editor = instantiate(cfg.editor.build)(module_shapes=experiment.module_shapes)
    return editor.to(experiment.device)


def set_up_editor(cfg: DictConfig, experiment: Experiment, editor: Editor) -> None:
    """Give the editor the experiment before any edit: model, tokenizer, edited modules and the configured
    preserved-knowledge statistics (computed only if the editor asks for them)."""
    statistics = instantiate(cfg.stats)(records=experiment.data.train) if cfg.get("stats") else None
    editor.setup(EditContext(experiment.model, experiment.loaded.tokenizer,
                             {name: em.module for name, em in experiment.editable.items()}, statistics))


def editor_checkpoint(editor: Editor, cfg: DictConfig) -> dict:
    """What `editor.ckpt` holds: the composed config (its `editor.build` rebuilds the editor), the shapes of
    the modules it was built for, its state; never the LLM."""
    return {"format": EDITOR_CHECKPOINT_FORMAT,
            "module_shapes": {name: list(shape) for name, shape in editor.module_shapes.items()},
            "state_dict": {k: v.detach().cpu() for k, v in editor.state_dict().items()},
            "config": OmegaConf.to_container(cfg, resolve=True)}


def checkpoint_editor_class(ckpt: dict) -> str:
    """The editor class a checkpoint read by `read_editor_checkpoint` names."""
    return ckpt["config"]["editor"]["build"]["_target_"]


def checkpoint_modules(ckpt: dict) -> list[str]:
    """The names of the modules a checkpoint read by `read_editor_checkpoint` was trained to edit."""
    return list(ckpt["module_shapes"])


def checkpoint_experiment(cfg: DictConfig, path: str) -> tuple[Experiment, Editor, dict]:
    """The checkpoint at `path` read, the experiment of `cfg` built on the modules it edits, and its editor
    on the model's device (with `cfg.checkpoint_options` replacing its build options, where set): what editing
    with a trained editor starts from."""
    ckpt = read_editor_checkpoint(path)
    try:
        experiment = build_experiment(cfg, checkpoint_modules(ckpt))
    except LayerSpecError as exc:
        raise ConfigError(f"checkpoint={path} was trained for modules {checkpoint_modules(ckpt)} of model "
                          f"{ckpt['config']['model']['name']!r}, which model={cfg.model.name} does not "
                          f"have: {exc}") from exc
    options = OmegaConf.to_container(cfg.checkpoint_options, resolve=True) if cfg.get("checkpoint_options") else {}
    editor = editor_from_checkpoint(ckpt, path, experiment.module_shapes, experiment.device, options)
    return experiment, editor, ckpt


def editor_from_checkpoint(ckpt: dict, path: str, module_shapes: dict[str, tuple[int, int]],
                           device: torch.device, options: dict | None = None) -> Editor:
    """The editor a checkpoint read by `read_editor_checkpoint` describes, for modules of `module_shapes`,
    with `options` replacing its build options."""
    saved = {name: tuple(shape) for name, shape in ckpt["module_shapes"].items()}
    if saved != module_shapes:
        raise ConfigError(f"checkpoint={path} was trained for modules {saved} of model "
                          f"{ckpt['config']['model']['name']!r}, but this model's edited modules are {module_shapes}")
    editor_class = checkpoint_editor_class(ckpt)
    try:  # only rledit's own editor classes: a checkpoint must never name code to run
        cls = get_class(editor_class) if editor_class.startswith("rledit.editors.") else None
    except (ImportError, ValueError):
        cls = None
    if cls is None or not issubclass(cls, Editor):
        raise ConfigError(f"checkpoint={path} names editor class {editor_class!r}, "
                          "which is not an rledit editor")
    saved_options = {k: v for k, v in ckpt["config"]["editor"]["build"].items() if k not in ("_target_", "_partial_")}
    options = saved_options | (options or {})
    state = ckpt["state_dict"]
    if ckpt["format"] == CALIBRATION_FREE_FORMAT:
        state = _with_calibrated_values(state, path, options)
    try:
        editor = cls(saved, **options)
        editor.load_state_dict(state)
    except (TypeError, RuntimeError, RleditError) as exc:  # unknown options; missing, extra, misshapen state
        raise ConfigError(f"checkpoint={path} does not fit {editor_class} with options {options}: "
                          f"{exc}") from exc
    return editor.to(device)


def _with_calibrated_values(state: dict, path: str, options: dict) -> dict:
    """A format-2 state with each learned log step size and ridge standing in for the calibrated value it started
    from. Only a recalibration reads those values, and it would then drop what training learned, so it is refused."""
    if options.get("recalibrate"):
        raise ConfigError(f"checkpoint={path} has format {CALIBRATION_FREE_FORMAT!r}, which does not store the "
                          "calibrated step sizes that recalibrate=true starts from: load it without recalibrate, "
                          "or train the editor again with this version")
    calibrated = {}
    for key, value in state.items():
        prefix, _, leaf = key.rpartition(".")
        if leaf in ("log_eta", "log_lambda"):
            calibrated[f"{prefix}.calibrated_{leaf}"] = value.clone()
    return {**state, **calibrated}


def read_editor_checkpoint(path: str) -> dict:
    """The checkpoint's dict, read with weights_only=True (tensors and plain containers only, no code)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as exc:
        raise ConfigError(f"checkpoint={path}: no such file (train one with `python train.py`)") from exc
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as exc:
        raise ConfigError(f"checkpoint={path} cannot be loaded with weights_only=True (it holds objects "
                          f"other than tensors and plain containers, or is damaged): {exc}") from exc
    if not isinstance(ckpt, dict) or not str(ckpt.get("format", "")).startswith("rledit-editor/"):
        raise ConfigError(f"checkpoint={path} is not an rledit editor checkpoint")
    if ckpt["format"] not in (EDITOR_CHECKPOINT_FORMAT, CALIBRATION_FREE_FORMAT):
        raise ConfigError(f"checkpoint={path} has format {ckpt['format']!r}, this rledit reads "
                          f"{EDITOR_CHECKPOINT_FORMAT!r} and {CALIBRATION_FREE_FORMAT!r}: train the editor again "
                          "with this version")
    missing = [key for key in ("module_shapes", "state_dict", "config") if key not in ckpt]
    build = ckpt.get("config", {}).get("editor", {}).get("build", {})
    if not missing and "_target_" not in build:
        missing = ["config.editor.build._target_"]
    if missing:
        raise ConfigError(f"checkpoint={path} is an incomplete editor checkpoint (missing {', '.join(missing)})")
    return ckpt
