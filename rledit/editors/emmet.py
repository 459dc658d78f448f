"""EMMET: the batch's edits as equality constraints, everything else kept as well as the prior allows."""

from __future__ import annotations

import torch

from rledit.editing.update import ModuleUpdate
from rledit.editors.locate import LocateEditor
from rledit.editors.ridge_solve import spd_solve


class EmmetEditor(LocateEditor):
    """dW = R^T (K A^-1 K^T + ridge I)^-1 K A^-1 with A = mom2_weight C + M: the update of least preserved
    change that maps every key exactly to its residual (a small ridge, relative to the N x N system's mean
    diagonal, keeps batches of thousands of near-parallel keys solvable)."""

    def __init__(self, module_shapes, ridge: float = 1e-4, **options):
        super().__init__(module_shapes, **options)
        self.options["ridge"] = ridge

    def solve(self, name: str, keys: torch.Tensor, residuals: torch.Tensor) -> ModuleUpdate:
        K = keys.double()
        A_inv_KT = spd_solve(self.preserved(name), K.T)  # d_in x N
        S = K @ A_inv_KT
        S = S + self.options["ridge"] * S.diagonal().mean() * torch.eye(S.shape[0], dtype=S.dtype, device=S.device)
        return ModuleUpdate(P=spd_solve(S, residuals.double()).float(), Q=A_inv_KT.T.float())
