"""AlphaEdit: MEMIT's update projected onto the null space of the preserved knowledge's keys."""

from __future__ import annotations

from typing import Any

import torch

from rledit.editing.update import ModuleUpdate
from rledit.editors.locate import LocateEditor
from rledit.editors.nullspace import check_threshold_kind, nullspace_projector


class AlphaEditEditor(LocateEditor):
    """dW = R^T K P (K^T K P + M P + ridge I)^-1, P = U0 U0^T over the eigenvectors of C whose eigenvalues are
    below `nullspace_threshold` (`relative`: times the largest eigenvalue, the default, which cannot empty
    the projector by a change of activation scale; `absolute`: the published code's 1e-2). Outputs at keys in
    the span of preserved text move by about nothing, however many edits are made. M is the Gram of the keys
    edited earlier in the sequence (the cache, reset for every sequence); `ridge` is relative to the mean
    eigenvalue of C.
    """

    def __init__(self, module_shapes, nullspace_threshold: float = 1e-2, threshold_kind: str = "relative",
                 ridge: float = 1.0, edit_memory: float = 1.0, **options):
        check_threshold_kind(threshold_kind, "alphaedit threshold_kind")
        super().__init__(module_shapes, edit_memory=edit_memory, **options)
        self.options.update(nullspace_threshold=nullspace_threshold, threshold_kind=threshold_kind, ridge=ridge)
        self.projectors: dict[str, torch.Tensor] = {}
        self.ranks: dict[str, int] = {}

    def prepare(self) -> None:
        for name, C in self.second_moments.items():
            self.projectors[name], self.ranks[name] = nullspace_projector(
                name, C, self.options["nullspace_threshold"], self.options["threshold_kind"])

    def report(self) -> dict[str, Any]:
        return {**super().report(), "projector_rank": dict(self.ranks)}

    def solve(self, name: str, keys: torch.Tensor, residuals: torch.Tensor) -> ModuleUpdate:
        P, K = self.projectors[name], keys.double()
        memory = self.key_memory.gram.get(name) if self.key_memory is not None else None
        gram = K.T @ K if memory is None else K.T @ K + memory.double()
        ridge = self.options["ridge"] * self.second_moments[name].double().diagonal().mean()
        B = P @ gram + ridge * torch.eye(P.shape[0], dtype=P.dtype, device=P.device)  # (K^T K P + M P + rI)^T
        return ModuleUpdate(P=residuals, Q=torch.linalg.solve(B, P @ K.T).T.float())
