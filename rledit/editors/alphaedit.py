"""AlphaEdit: MEMIT's update projected onto the null space of the preserved knowledge's keys."""

from __future__ import annotations

import warnings
from typing import Any

import torch

from rledit.editing.update import ModuleUpdate
from rledit.editors.locate import LocateEditor
from rledit.errors import ConfigError

THRESHOLD_KINDS = ("relative", "absolute")


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
        if threshold_kind not in THRESHOLD_KINDS:
            raise ConfigError(f"alphaedit threshold_kind={threshold_kind!r}: expected one of {THRESHOLD_KINDS}")
        super().__init__(module_shapes, edit_memory=edit_memory, **options)
        self.options.update(nullspace_threshold=nullspace_threshold, threshold_kind=threshold_kind, ridge=ridge)
        self.projectors: dict[str, torch.Tensor] = {}
        self.ranks: dict[str, int] = {}

    def prepare(self) -> None:
        for name, C in self.second_moments.items():
            values, vectors = torch.linalg.eigh(C.double())
            limit = self.options["nullspace_threshold"] * (values.max() if self.options["threshold_kind"] ==
                                                           "relative" else 1.0)
            kept = vectors[:, values < limit]
            rank = kept.shape[1]
            if rank == 0:
                raise ConfigError(
                    f"alphaedit: the null space of module '{name}' is empty at nullspace_threshold="
                    f"{self.options['nullspace_threshold']} ({self.options['threshold_kind']}; eigenvalues of C "
                    f"span {float(values.min()):.3g} .. {float(values.max()):.3g}): every update would be zero")
            if rank == C.shape[0]:
                warnings.warn(f"alphaedit: the projector of '{name}' keeps every direction (rank {rank}): "
                              "it protects nothing; lower nullspace_threshold")
            self.projectors[name] = kept @ kept.T  # fp64, like the solve
            self.ranks[name] = rank

    def report(self) -> dict[str, Any]:
        return {**super().report(), "projector_rank": dict(self.ranks)}

    def solve(self, name: str, keys: torch.Tensor, residuals: torch.Tensor) -> ModuleUpdate:
        P, K = self.projectors[name], keys.double()
        memory = self.key_memory.gram.get(name) if self.key_memory is not None else None
        gram = K.T @ K if memory is None else K.T @ K + memory.double()
        ridge = self.options["ridge"] * self.second_moments[name].double().diagonal().mean()
        B = P @ gram + ridge * torch.eye(P.shape[0], dtype=P.dtype, device=P.device)  # (K^T K P + M P + rI)^T
        return ModuleUpdate(P=residuals, Q=torch.linalg.solve(B, P @ K.T).T.float())
