"""ROME: one rank-one update of one MLP output projection per request, the requests of a batch in turn."""

from __future__ import annotations

import torch

from rledit.editing.update import ModuleUpdate
from rledit.editors.locate import LocateEditor
from rledit.editors.ridge_solve import spd_solve
from rledit.errors import ConfigError


class RomeEditor(LocateEditor):
    """dW_i = r_i (A^-1 k_i)^T / ((A^-1 k_i)^T k_i) with A = mom2_weight C + M (the scale of A cancels).

    Requests of one batch are edited one after another: request i's residual is what is left after the
    rank-one updates of requests before it, r_i - sum_{j<i} dW_j k_i, solved in one triangular system.
    """

    def __init__(self, module_shapes, **options):
        if len(module_shapes) != 1:
            raise ConfigError(f"ROME edits exactly one module, got {len(module_shapes)}: "
                              f"{', '.join(module_shapes)} (use MEMIT or EMMET for several)")
        super().__init__(module_shapes, **options)

    def solve(self, name: str, keys: torch.Tensor, residuals: torch.Tensor) -> ModuleUpdate:
        K = keys.double()
        u = spd_solve(self.preserved(name), K.T).T  # N x d_in: A^-1 k_i
        Q = u / (u * K).sum(-1, keepdim=True)
        G = Q @ K.T  # G[j, i] = (dW_j k_i) / p_j
        lower = torch.eye(len(K), dtype=G.dtype, device=G.device) + torch.tril(G.T, diagonal=-1)
        P = torch.linalg.solve_triangular(lower, residuals.double(), upper=False)
        return ModuleUpdate(P=P.float(), Q=Q.float())
