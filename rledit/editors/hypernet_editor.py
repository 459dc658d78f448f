"""Editors driven by a hypernetwork bank: MEND, MALMEN, RLEdit and the training-free editor."""

from __future__ import annotations

import math
from abc import abstractmethod
from collections.abc import Mapping

import torch

from rledit.editing.update import FactoredUpdate, ModuleUpdate, refuse_non_finite
from rledit.editors.factor_editor import FactorEditor
from rledit.editors.hypernet import HyperNetworkBank
from rledit.errors import EditRefusedError
from rledit.models.capture import CapturedFactors


class HypernetEditor(FactorEditor):
    """Transforms captured (K, G) with a per-shape hypernetwork, then aggregates them into an update.

    Step sizes (and ridges) are set on the first batch the editor sees, from the scale of its captured
    factors: the untrained editor shifts each module's outputs by about `init_shift` times their norm,
    so it already makes a real edit on the model at hand whatever that model's scale; training refines
    them.

    `norm_per_sequence` starts the normalizer's statistics empty for every edit sequence (each training
    rollout, each evaluation session) instead of carrying them over from training: a trained editor then
    normalizes at test time exactly as it did in training, where statistics saturated by thousands of
    training edits would no longer follow the drift of a long edit sequence.

    `recalibrate` sets the step sizes (and ridges) again on the first batch of every edit sequence, keeping
    what training added to the values it started from: a trained editor then scales its steps to the
    requests at hand as the untrained editor does, instead of to the one training batch it was first
    calibrated on.
    """

    trainable = True
    net_kind: str

    def __init__(self, module_shapes: Mapping[str, tuple[int, int]], capture_tokens: str = "target",
                 rank: int = 64, n_blocks: int = 1, normalize: bool = True, lifelong_norm: bool = True,
                 init_shift: float = 1.0, norm_per_sequence: bool = False, rounds: int = 1,
                 recalibrate: bool = False, round_decay: float = 1.0):
        super().__init__(module_shapes, capture_tokens, rounds, round_decay)
        self.hparams = {"rank": rank, "n_blocks": n_blocks, "normalize": normalize,
                        "lifelong_norm": lifelong_norm, "init_shift": init_shift,
                        "norm_per_sequence": norm_per_sequence, "rounds": rounds, "recalibrate": recalibrate,
                        "round_decay": round_decay}
        self.bank = HyperNetworkBank(self.module_shapes, net=self.net_kind, rank=rank, n_blocks=n_blocks,
                                     normalize=normalize, update_during_edit=lifelong_norm)
        self.register_buffer("calibrated", torch.tensor(False))

    @property
    def needs_calibration(self) -> bool:
        return not bool(self.calibrated)

    def update_from_factors(self, factors: Mapping[str, CapturedFactors]) -> FactoredUpdate:
        update = {}
        for name, f in factors.items():
            keys_t, grads_t = self.bank(name, f.keys, f.grads)
            if not bool(self.calibrated):
                self._calibrate(name, f, keys_t, grads_t)
            update[name] = self.aggregate(name, f, keys_t, grads_t)
        self.calibrated.fill_(True)
        return update

    def reverted(self, k: int | None = None) -> None:
        super().reverted(k)
        if k is None and self.hparams["norm_per_sequence"]:
            for normalizer in self.bank.normalizers.values():
                normalizer.reset()
        if k is None and self.hparams["recalibrate"]:
            self.calibrated.fill_(False)

    @torch.no_grad()
    def _calibrate(self, name: str, f: CapturedFactors, keys_t: torch.Tensor, grads_t: torch.Tensor) -> None:
        """Set the module's step size from its factors' scale.

        Factors that give no usable step size (non-finite, or a step of zero or infinity) raise
        EditRefusedError: the editor then stays uncalibrated, and the next usable batch calibrates it.
        """
        what = f"module '{name}': step size calibration refused"
        refuse_non_finite(what, {"keys": f.keys, "output norms": f.output_norms,
                                 "transformed keys": keys_t, "transformed value gradients": grads_t})
        shift_at_unit_step = self.shift_coefficients(f.keys, keys_t).abs() * grads_t.norm(dim=-1)
        tiny = torch.finfo(torch.float32).tiny
        eta = float(self.hparams["init_shift"] * f.output_norms.median()
                    / shift_at_unit_step.median().clamp(min=tiny))
        if not 0.0 < eta < math.inf:
            raise EditRefusedError(f"{what}: the step size came out {eta} (median output norm "
                                   f"{float(f.output_norms.median())}, median shift at unit step "
                                   f"{float(shift_at_unit_step.median())})")
        self.bank.calibrate_log_eta(name, math.log(eta))

    @staticmethod
    def shift_coefficients(keys: torch.Tensor, keys_t: torch.Tensor) -> torch.Tensor:
        """<k_i, k~_i>: how strongly token i's key meets its transformed key."""
        return (keys * keys_t).sum(-1)

    @abstractmethod
    def aggregate(self, name: str, f: CapturedFactors, keys_t: torch.Tensor, grads_t: torch.Tensor) -> ModuleUpdate:
        """Combine the transformed factors of one module into its update."""
