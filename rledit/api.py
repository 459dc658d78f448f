"""rledit from Python: build or load an editor, wrap any Hugging Face causal LM for editing, edit plain
dicts, revert, save, and run the lifelong protocol; the same objects and errors as the command line."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from torch import nn

from rledit.data.collate import EditCollator
from rledit.data.records import EditRecord, record_from_mapping
from rledit.data.sources import EditData
from rledit.editors.base import EditContext, Editor
from rledit.errors import ConfigError
from rledit.evaluation.runner import LifelongResult, Protocol, run_lifelong
from rledit.evaluation.saved_edits import save_edited_model
from rledit.evaluation.scoring import text_rows
from rledit.models.layers import resolve_edit_modules
from rledit.models.statistics import PreservedStatistics
from rledit.paths import CONFIG_DIR
from rledit.pipeline import (
    checkpoint_modules,
    editor_from_checkpoint,
    read_editor_checkpoint,
    require_subjects,
    row_length_limit,
)
from rledit.session import EditSession


def _config(overrides: Sequence[str]):
    with initialize_config_dir(str(CONFIG_DIR), version_base=None):
        return compose("evaluate", overrides=list(overrides))


@dataclass
class ConfiguredModel:
    """A frozen model and tokenizer loaded from `configs/model/<name>.yaml`, with the layers it edits."""

    name: str
    model: nn.Module
    tokenizer: Any
    edit_modules: list[str]
    """Layer specs the hypernetwork, training-free and fine-tuning editors edit."""
    locate_modules: list[str] | None
    """Layer specs the locate-then-edit editors (ROME, MEMIT, EMMET, AlphaEdit) edit."""
    loaded: Any
    """What the config's loader returned (for tiny, a WorldModel that also holds the world)."""


def load_model(name: str, *overrides: str) -> ConfiguredModel:
    """The model of `configs/model/<name>.yaml` (tiny: the synthetic world's, pretrained on first use),
    with Hydra overrides such as "model.load.dtype=bfloat16"."""
    cfg = _config([f"model={name}", *overrides])
    loaded = instantiate(cfg.model.load)
    locate = cfg.model.get("locate_modules")
    return ConfiguredModel(name, loaded.model, loaded.tokenizer, list(cfg.model.edit_modules),
                           None if locate is None else list(locate), loaded)


def load_data(name: str, model: ConfiguredModel, *overrides: str) -> EditData:
    """The edit requests of `configs/data/<name>.yaml` for `model` (train and eval, disjoint), with Hydra
    overrides such as "data.records.limit=100"."""
    cfg = _config([f"model={model.name}", f"data={name}", *overrides])
    collator = EditCollator(model.tokenizer, max_length=row_length_limit(cfg.model.get("max_length"), model.model))
    return instantiate(cfg.data.records)(model.loaded, collator)


def make_editor(name: str, model: nn.Module | ConfiguredModel, modules: str | Sequence[str] | None = None,
                **options: Any) -> Editor:
    """The editor of `configs/editor/<name>.yaml` for `modules` of `model` (layer specs such as
    "model.layers.{3-7}.mlp.down_proj"; for a ConfiguredModel, by default the layers its config names for
    this editor), its build options overridden by `options`."""
    try:
        cfg = _config([f"editor={name}"])
    except Exception as exc:  # Hydra's own error lists the available editor configs
        raise ConfigError(f"no editor config {name!r}: {exc}") from exc
    if isinstance(model, ConfiguredModel):
        locate = cfg.editor.get("modules") == "locate"
        modules = modules or (model.locate_modules if locate else model.edit_modules)
        model = model.model
    if not modules:
        raise ConfigError(f"make_editor({name!r}): give the layers to edit, e.g. "
                          "modules='model.layers.{3-7}.mlp.down_proj'")
    editable = resolve_edit_modules(model, modules)
    build = instantiate(cfg.editor.build, **options)
    editor = build(module_shapes={n: (em.d_out, em.d_in) for n, em in editable.items()})
    return editor.to(next(model.parameters()).device)


def load_editor(path: str | Path, model: nn.Module) -> Editor:
    """The trained editor of an `editor.ckpt` written by `python train.py`, checked against `model`."""
    ckpt = read_editor_checkpoint(str(path))
    editable = resolve_edit_modules(model, checkpoint_modules(ckpt))
    return editor_from_checkpoint(ckpt, str(path), {n: (em.d_out, em.d_in) for n, em in editable.items()},
                                  next(model.parameters()).device)


def preserved_statistics(source: str = "sampled", **options: Any) -> PreservedStatistics:
    """Preserved-knowledge statistics (for MEMIT, AlphaEdit, EMMET, ROME) from `configs/stats/source/<source>`
    (sampled, wikitext, records, hub), options such as num_tokens overriding configs/stats/default.yaml."""
    cfg = _config([f"stats/source={source}"])
    return instantiate(cfg.stats, **options)(records=())


class EditedModel:
    """A frozen causal LM under edit: every `edit` is committed to its weights and revertible in order.

    Editors that keep preserved knowledge read `statistics`; by default they come from text the model samples
    itself (`preserved_statistics()`, computed only if the editor asks for them, and cached), as in evaluate.py.
    """

    def __init__(self, model: nn.Module, tokenizer, editor: Editor, statistics: PreservedStatistics | None = None,
                 max_length: int | None = None):
        editable = resolve_edit_modules(model, list(editor.module_shapes))
        self.model, self.tokenizer, self.editor = model, tokenizer, editor
        self.collator = EditCollator(tokenizer, max_length=max_length)
        statistics = preserved_statistics() if statistics is None else statistics
        editor.setup(EditContext(model, tokenizer, {n: em.module for n, em in editable.items()}, statistics))
        self.session = EditSession(model, editable, editor)

    def edit(self, requests: Iterable[EditRecord | Mapping[str, Any]]) -> None:
        """Edit `requests` (EditRecords or dicts of their fields) into the model as one batch.

        A refused edit (non-finite update, singular solve) raises EditRefusedError and leaves the model
        and the editor exactly as they were."""
        records = as_records(requests)
        require_subjects(records, self.editor)
        problems = [(i, p) for i, p in enumerate(self.collator.row_problems(records)) if p is not None]
        if problems:
            (index, (field, message)), = problems[:1]
            raise ConfigError(f"request {index} ({records[index].record_id!r}), field {field}: {message}")
        batch = self.collator(records).edit.to(next(self.model.parameters()).device)
        self.session.edit(batch)

    def revert(self, k: int | None = None) -> None:
        """Undo the last `k` edits (all of them when None), bit for bit."""
        self.session.revert(k)

    @property
    def num_edits(self) -> int:
        return len(self.session.ledger)

    def save_pretrained(self, path: str | Path) -> Path:
        """The edited model, its tokenizer and the ledger of edits in the new folder `path` (see
        rledit.evaluation.saved_edits.revert_saved_edits to undo them after loading)."""
        return save_edited_model(self.session, self.tokenizer, path)


def evaluate(edited: EditedModel, records: Sequence[EditRecord | Mapping[str, Any]], num_steps: int,
             edits_per_step: int, eval_timing: str = "final", seed: int = 0, eval_batch_size: int = 64,
             heldout_text: Sequence[str] | None = None) -> LifelongResult:
    """The lifelong protocol of `python evaluate.py` on `edited` (which keeps the edits): num_steps x
    edits_per_step requests drawn from `records` with `seed`, metrics as configured by `eval_timing`."""
    protocol = Protocol(num_steps, edits_per_step, eval_timing=eval_timing, seed=seed,
                        eval_batch_size=eval_batch_size)
    records = as_records(records)
    require_subjects(records, edited.editor)
    heldout = None if heldout_text is None else text_rows(edited.tokenizer, heldout_text, edited.collator.max_length)
    return run_lifelong(edited.session, edited.collator, records, protocol, heldout=heldout)


def as_records(requests: Iterable[EditRecord | Mapping[str, Any]]) -> list[EditRecord]:
    records = [r if isinstance(r, EditRecord) else record_from_mapping(r, index=i) for i, r in enumerate(requests)]
    if not records:
        raise ConfigError("no edit requests given")
    return records
