"""An edit session: a frozen model, its edited modules, an editor, and the ledger of what was committed."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from rledit.editing.ledger import UpdateLedger
from rledit.editing.update import FactoredUpdate
from rledit.editors.base import Editor
from rledit.models.layers import EditableModule


class EditSession:
    """Applies an editor's updates to a model one batch after another; every commit is revertible."""

    def __init__(self, model: nn.Module, editable: Mapping[str, EditableModule], editor: Editor,
                 backend: str = "auto"):
        self.model, self.editor = model, editor
        self.editable = dict(editable)
        self.modules = {name: em.module for name, em in self.editable.items()}
        self.ledger = UpdateLedger({name: em.weight_view() for name, em in self.editable.items()}, backend)
        editor.reverted()  # a new edit sequence starts from these weights

    def predict(self, batch) -> FactoredUpdate:
        """The editor's update for `batch` on the current weights (no graph kept into the editor)."""
        with torch.no_grad():
            return self.editor.predict_update(self.model, self.modules, batch)

    def edit(self, batch) -> FactoredUpdate:
        """Predict and commit the update for `batch`; a refused update leaves the model unchanged."""
        update = self.predict(batch)
        self.ledger.commit(update)
        self.editor.committed()
        return update

    def revert(self, k: int | None = None) -> None:
        self.ledger.revert(k)
        self.editor.reverted(k)
