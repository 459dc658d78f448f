"""Keeping edits: save an edited model with the ledger of its updates, and revert them after reloading.

The folder holds what `save_pretrained` writes (the edited model and its tokenizer), `edits.safetensors`
(the ledger: every committed factored update, in order) and `original_weights.safetensors` (the edited
modules' weights before any edit, in the model's dtype). Keeping the originals is what makes the revert
exact: subtracting the updates from the saved weights would leave fp32 rounding (and, for bf16 models,
bf16 rounding of the edited weights) behind, while restoring the originals gives back the unedited model
bit for bit. They cost only the edited modules' size, not the model's.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import PreTrainedTokenizerBase

from rledit.atomic_write import partial_path
from rledit.editing.ledger import UpdateLedger
from rledit.errors import ConfigError, RleditError
from rledit.models.layers import resolve_edit_modules
from rledit.session import EditSession

EDITS_FILE = "edits.safetensors"
ORIGINALS_FILE = "original_weights.safetensors"


def save_edited_model(session: EditSession, tokenizer: PreTrainedTokenizerBase, path: str | Path) -> Path:
    """Write the session's edited model, tokenizer, ledger and original weights to the new folder `path`.

    Everything is written to a temporary sibling folder first and renamed at the end, so `path` is
    either complete or absent (a killed run's temporary folder is removed by the next save there). The
    originals are read by reverting the ledger (bit-exact) and replaying its updates from the file just
    written, which leaves the weights bit-identical to before.
    """
    path = Path(path)
    if path.exists():
        raise ConfigError(f"save_edited={path} already exists; choose a new folder")
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = partial_path(path)
    shutil.rmtree(partial, ignore_errors=True)
    try:
        session.model.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        session.ledger.save(partial / EDITS_FILE)
        committed = len(session.ledger)
        session.ledger.revert()
        originals = {name: em.weight_view().detach().contiguous().cpu() for name, em in session.editable.items()}
        save_file(originals, str(partial / ORIGINALS_FILE))
        if session.ledger.load(partial / EDITS_FILE) != committed:
            raise RleditError(f"replaying {partial / EDITS_FILE} did not restore the {committed} committed updates")
        os.rename(partial, path)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return path


def open_saved_edits(model: nn.Module, path: str | Path) -> UpdateLedger:
    """The ledger of a model reloaded from a `save_edited` folder, ready to revert any number of its edits.

    Restores the saved original weights of the edited modules, then commits the saved updates again in
    order: the weights are the edited ones (bit-identical to the saved ones on the device and backend
    that made them) and `ledger.revert(k)` undoes the last k edits exactly.
    """
    path = Path(path)
    originals = _read(path / ORIGINALS_FILE)
    editable = resolve_edit_modules(model, sorted(originals))
    with torch.no_grad():
        for name, em in editable.items():
            view = em.weight_view()
            if view.shape != originals[name].shape:
                raise RleditError(f"{path / ORIGINALS_FILE}: {name} has shape {tuple(originals[name].shape)}, "
                                  f"the model's is {tuple(view.shape)}: not the model these edits were saved with")
            view.copy_(originals[name])
    ledger = UpdateLedger({name: em.weight_view() for name, em in editable.items()})
    ledger.load(path / EDITS_FILE)
    return ledger


def revert_saved_edits(model: nn.Module, path: str | Path, k: int | None = None) -> UpdateLedger:
    """Undo the last `k` edits (all when None) of a model reloaded from the `save_edited` folder `path`.

    With k=None the edited modules get back their saved original weights bit for bit, so the model's
    outputs are exactly those of the unedited model. Returns the ledger of the edits that remain.
    """
    ledger = open_saved_edits(model, path)
    ledger.revert(k)
    return ledger


def _read(file: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(file))
    except (OSError, ValueError) as exc:
        raise RleditError(f"cannot read {file}: {exc} (is this a folder written by save_edited?)") from exc
