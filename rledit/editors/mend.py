"""MEND: the hypernetwork's transformed factors summed into a gradient-like update."""

from __future__ import annotations

import torch

from rledit.editing.update import ModuleUpdate
from rledit.editors.hypernet_editor import HypernetEditor
from rledit.models.capture import CapturedFactors


class MendEditor(HypernetEditor):
    """dW = -eta * G~^T K~ (sum of per-token rank-one terms, kept factored).

    With the identity network and no normalization this is exactly the gradient step -eta * grad W.
    """

    net_kind = "mend"

    def aggregate(self, name: str, f: CapturedFactors, keys_t: torch.Tensor, grads_t: torch.Tensor) -> ModuleUpdate:
        step = -self.bank.log_eta(name).exp()
        return ModuleUpdate(P=grads_t, Q=keys_t, scale=step.expand(keys_t.shape[0]))
