"""MEMIT: the residual spread over the edited layers, each solved against the preserved-knowledge prior."""

from __future__ import annotations

import torch

from rledit.editing.update import ModuleUpdate
from rledit.editors.locate import LocateEditor
from rledit.editors.ridge_solve import spd_solve


class MemitEditor(LocateEditor):
    """dW = R^T K (mom2_weight C + M + K^T K)^-1, factored as P = R, Q = K (...)^-1 (rank N).

    M is the Gram of earlier edits' keys when `edit_memory` > 0 (sequential MEMIT), else nothing.
    """

    def solve(self, name: str, keys: torch.Tensor, residuals: torch.Tensor) -> ModuleUpdate:
        K = keys.double()
        return ModuleUpdate(P=residuals, Q=spd_solve(self.preserved(name) + K.T @ K, K.T).T.float())
