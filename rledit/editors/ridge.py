"""The ridge editors' aggregation (MALMEN, RLEdit, training-free): value shifts solved by ridge least squares."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from rledit.editing.update import ModuleUpdate
from rledit.editors.hypernet_editor import HypernetEditor
from rledit.editors.key_memory import KeyMemory
from rledit.editors.ridge_solve import ridge_update
from rledit.errors import EditRefusedError
from rledit.models.capture import CapturedFactors


class RidgeEditor(HypernetEditor):
    """D = diag(c) G~ with c_i = -eta <k_i, k~_i>; the update maps each key k_i to its shift d_i (ridge-regularised).

    `edit_memory` > 0 also regularises by that weight times the Gram matrix of the keys committed earlier in
    the sequence (see key_memory.py); 0 is the plain ridge (MALMEN's and UltraEdit's solve).
    """

    net_kind = "ridge"

    def __init__(self, module_shapes: Mapping[str, tuple[int, int]], capture_tokens: str = "target",
                 rank: int = 64, n_blocks: int = 1, normalize: bool = True, lifelong_norm: bool = True,
                 init_shift: float = 1.0, init_ridge: float = 0.1, edit_memory: float = 0.0,
                 norm_per_sequence: bool = False):
        super().__init__(module_shapes, capture_tokens, rank, n_blocks, normalize, lifelong_norm, init_shift,
                         norm_per_sequence)
        self.hparams.update(init_ridge=init_ridge, edit_memory=edit_memory)
        self.key_memory = KeyMemory(edit_memory) if edit_memory > 0 else None

    @torch.no_grad()
    def _calibrate(self, name: str, f: CapturedFactors, keys_t: torch.Tensor, grads_t: torch.Tensor) -> None:
        """Also set e^lambda to `init_ridge` times the mean squared key norm (refused if that is not a
        positive finite number, like the step size)."""
        super()._calibrate(name, f, keys_t, grads_t)
        ridge = float(self.hparams["init_ridge"] * f.keys.pow(2).sum(-1).mean())
        if not 0.0 < ridge < math.inf:
            raise EditRefusedError(f"module '{name}': ridge calibration refused: e^lambda came out {ridge} "
                                   f"(init_ridge {self.hparams['init_ridge']})")
        self.bank.set_log_lambda(name, math.log(ridge))

    def aggregate(self, name: str, f: CapturedFactors, keys_t: torch.Tensor, grads_t: torch.Tensor) -> ModuleUpdate:
        coeffs = -self.bank.log_eta(name).exp() * self.shift_coefficients(f.keys, keys_t)
        memory = None
        if self.key_memory is not None:
            self.key_memory.propose(name, f.keys)
            memory = self.key_memory.gram.get(name)
        return ridge_update(f.keys, coeffs[:, None] * grads_t, self.bank.log_lambda(name).exp(), memory=memory)

    def committed(self) -> None:
        if self.key_memory is not None:
            self.key_memory.commit()

    def reverted(self, k: int | None = None) -> None:
        super().reverted(k)
        if self.key_memory is not None:
            self.key_memory.revert(k)
