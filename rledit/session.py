"""An edit session: a frozen model, its edited modules, an editor, and the ledger of what was committed."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from rledit.editing.ledger import UpdateLedger
from rledit.editing.update import FactoredUpdate
from rledit.editors.base import Editor
from rledit.errors import EditRefusedError
from rledit.heap import release_free_heap
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
        """Predict and commit the update for `batch`.

        Raises EditRefusedError when the editor or the ledger refuses the update (non-finite factors, solve
        or update; a malformed update) or a finite ridge system is still not positive definite. A refused
        edit leaves no trace: the ledger has not changed the weights, and the editor's state (lifelong
        normalizer statistics, step sizes set on its first batch) is put back, so a poisoned batch cannot
        make every later edit fail too.
        """
        editor_state = self.editor.snapshot()
        try:
            update = self.predict(batch)
            self.ledger.commit(update)
        except EditRefusedError:
            self.editor.restore(editor_state)
            raise
        except torch.linalg.LinAlgError as exc:
            self.editor.restore(editor_state)
            raise EditRefusedError(f"the editor's solve failed: {exc}") from exc
        self.editor.committed()
        release_free_heap()
        return update

    def revert(self, k: int | None = None) -> None:
        self.ledger.revert(k)
        self.editor.reverted(k)
