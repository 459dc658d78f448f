"""Fine-tuning of the edited layers: a few plain gradient steps on the edit loss per batch.

Plain gradient descent keeps the update exactly factored: each step (a round of FactorEditor) adds the rows
(-lr * G, K) of its own gradient G^T K, so the whole update is the concatenation of the steps' factors. An optional
Frobenius-norm constraint shrinks each module's update onto a ball of radius `max_norm`.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from rledit.editing.update import FactoredUpdate, ModuleUpdate
from rledit.editors.factor_editor import FactorEditor
from rledit.errors import ConfigError
from rledit.models.capture import CapturedFactors


class FineTuneEditor(FactorEditor):
    """`steps` gradient steps of size `lr` on the edited modules, evaluated functionally between steps."""

    def __init__(self, module_shapes: Mapping[str, tuple[int, int]], capture_tokens: str = "target",
                 steps: int = 5, lr: float = 1e-2, max_norm: float | None = None):
        if steps < 1 or lr <= 0 or (max_norm is not None and max_norm <= 0):
            raise ConfigError(f"fine-tune editor: steps={steps}, lr={lr}, max_norm={max_norm}: "
                              "need steps >= 1, lr > 0 and max_norm > 0 or null")
        super().__init__(module_shapes, capture_tokens, rounds=steps)
        self.lr, self.max_norm = lr, max_norm

    def predict_update(self, model: nn.Module, modules: Mapping[str, nn.Module], batch) -> FactoredUpdate:
        update = super().predict_update(model, modules, batch)
        return update if self.max_norm is None else {n: self._constrain(u) for n, u in update.items()}

    def update_from_factors(self, factors: Mapping[str, CapturedFactors]) -> FactoredUpdate:
        return {name: self._gradient_step(f) for name, f in factors.items()}

    def _gradient_step(self, f: CapturedFactors) -> ModuleUpdate:
        return ModuleUpdate(P=f.grads, Q=f.keys, scale=torch.full((f.num_tokens,), -self.lr, device=f.keys.device))

    def _constrain(self, u: ModuleUpdate) -> ModuleUpdate:
        norm = float(u.frobenius_sq().sqrt())
        shrink = min(1.0, self.max_norm / norm) if norm > 0 else 1.0
        return ModuleUpdate(u.P, u.Q, u.masked_scale() * shrink)

