"""The ridge editors' aggregation (MALMEN, RLEdit, training-free): value shifts solved by ridge least squares."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from rledit.editing.update import ModuleUpdate, row_clamp_factors
from rledit.editors.base import EditContext
from rledit.editors.hypernet_editor import HypernetEditor
from rledit.editors.key_memory import KeyMemory
from rledit.editors.nullspace import check_threshold_kind, nullspace_projector
from rledit.editors.ridge_solve import ridge_update
from rledit.errors import ConfigError, EditRefusedError
from rledit.models.capture import CapturedFactors


class RidgeEditor(HypernetEditor):
    """D = diag(c) G~ with c_i = -eta <k_i, k~_i>; the update maps each key k_i to its shift d_i (ridge-regularised).

    `edit_memory` > 0 also regularises by that weight times the Gram matrix of the keys committed earlier in
    the sequence (see key_memory.py); 0 is the plain ridge (MALMEN's and UltraEdit's solve). Preserved
    knowledge, from the statistics `setup` receives: `preserve_weight` > 0 adds MEMIT's prior (that weight
    times C = E[k k^T] over generic text: the solve keeps the outputs of that many generic tokens as it
    keeps one edit's), `nullspace_threshold` confines every update to AlphaEdit's null space of C.
    `clamp_norm` bounds each token's value shift by that multiple of its output's norm (MEMIT's clamp): the
    step size is set for the median token, and one token with an outsized gradient could otherwise write a
    shift many times its output into the weights.
    """

    net_kind = "ridge"

    def __init__(self, module_shapes: Mapping[str, tuple[int, int]], capture_tokens: str = "target",
                 rank: int = 64, n_blocks: int = 1, normalize: bool = True, lifelong_norm: bool = True,
                 init_shift: float = 1.0, init_ridge: float = 0.1, edit_memory: float = 0.0,
                 norm_per_sequence: bool = False, preserve_weight: float = 0.0,
                 nullspace_threshold: float | None = None, threshold_kind: str = "relative", rounds: int = 1,
                 clamp_norm: float | None = None, recalibrate: bool = False, round_decay: float = 1.0):
        super().__init__(module_shapes, capture_tokens, rank, n_blocks, normalize, lifelong_norm, init_shift,
                         norm_per_sequence, rounds, recalibrate, round_decay)
        if preserve_weight < 0 or any(v is not None and v <= 0 for v in (nullspace_threshold, clamp_norm)):
            raise ConfigError(f"ridge editor: preserve_weight={preserve_weight} must be >= 0, "
                              f"nullspace_threshold={nullspace_threshold} and clamp_norm={clamp_norm} > 0 or null")
        check_threshold_kind(threshold_kind, "ridge editor threshold_kind")
        self.hparams.update(init_ridge=init_ridge, edit_memory=edit_memory, preserve_weight=preserve_weight,
                            nullspace_threshold=nullspace_threshold, threshold_kind=threshold_kind,
                            clamp_norm=clamp_norm)
        self.key_memory = KeyMemory(edit_memory) if edit_memory > 0 else None
        self.priors: dict[str, torch.Tensor] = {}      # preserve_weight x C, per module (from setup)
        self.projectors: dict[str, torch.Tensor] = {}  # null-space projectors, per module (from setup)
        self.projector_ranks: dict[str, int] = {}
        self.statistics_info: dict[str, Any] = {}

    @property
    def preserves_knowledge(self) -> bool:
        return self.hparams["preserve_weight"] > 0 or self.hparams["nullspace_threshold"] is not None

    def setup(self, context: EditContext) -> None:
        if not self.preserves_knowledge:
            return
        if context.statistics is None:
            raise ConfigError("the ridge editor's preserve_weight / nullspace_threshold need preserved-knowledge "
                              "statistics: configure `stats` (for example stats/source=wikitext)")
        modules = {name: context.modules[name] for name in self.module_shapes}
        moments = context.statistics.second_moments(context.model, context.tokenizer, modules)
        for name, C in moments.items():
            if self.hparams["preserve_weight"] > 0:
                self.priors[name] = self.hparams["preserve_weight"] * C.float()
            if self.hparams["nullspace_threshold"] is not None:
                projector, self.projector_ranks[name] = nullspace_projector(
                    name, C, self.hparams["nullspace_threshold"], self.hparams["threshold_kind"])
                self.projectors[name] = projector.float()
        self.statistics_info = context.statistics.describe()

    def report(self) -> dict[str, Any]:
        if not self.preserves_knowledge:
            return {}
        return {"statistics": self.statistics_info, **({"projector_rank": dict(self.projector_ranks)}
                                                       if self.projector_ranks else {})}

    @torch.no_grad()
    def _calibrate(self, name: str, f: CapturedFactors, keys_t: torch.Tensor, grads_t: torch.Tensor) -> None:
        """Also set e^lambda to `init_ridge` times the mean squared norm of the keys the solve sees (projected,
        under a null-space projector), refused if that is not a positive finite number, like the step size."""
        super()._calibrate(name, f, keys_t, grads_t)
        keys = f.keys if name not in self.projectors else f.keys.float() @ self.projectors[name]
        ridge = float(self.hparams["init_ridge"] * keys.pow(2).sum(-1).mean())
        if not 0.0 < ridge < math.inf:
            raise EditRefusedError(f"module '{name}': ridge calibration refused: e^lambda came out {ridge} "
                                   f"(init_ridge {self.hparams['init_ridge']})")
        self.bank.calibrate_log_lambda(name, math.log(ridge))

    def aggregate(self, name: str, f: CapturedFactors, keys_t: torch.Tensor, grads_t: torch.Tensor) -> ModuleUpdate:
        coeffs = -self.bank.log_eta(name).exp() * self.shift_coefficients(f.keys, keys_t)
        shifts = coeffs[:, None] * grads_t
        if self.hparams["clamp_norm"] is not None:
            shifts = shifts * row_clamp_factors(shifts.detach(), self.hparams["clamp_norm"] * f.output_norms)
        memory = None
        if self.key_memory is not None:
            memory = self.key_memory.regulariser(name)
            self.key_memory.propose(name, f.keys)
        if self.preserves_knowledge and not (self.priors or self.projectors):
            raise ConfigError("the ridge editor preserves knowledge from statistics: setup(context) must run first")
        return ridge_update(f.keys, shifts, self.bank.log_lambda(name).exp(), memory=memory,
                            prior=self.priors.get(name), projector=self.projectors.get(name))

    def start_update(self) -> None:
        if self.key_memory is not None:
            self.key_memory.discard_pending()

    def committed(self) -> None:
        if self.key_memory is not None:
            self.key_memory.commit()

    def reverted(self, k: int | None = None) -> None:
        super().reverted(k)
        if self.key_memory is not None:
            self.key_memory.revert(k)

    def sequence_state(self) -> dict[str, Any]:
        return {**super().sequence_state(), "key_memory": self.key_memory}

    def load_sequence_state(self, state: dict[str, Any]) -> None:
        super().load_sequence_state(state)
        self.key_memory = state["key_memory"]
