"""The editor interface: an edit batch in, a factored update of the edited modules out."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping

import torch
from torch import nn

from rledit.editing.losses import forward_logits, target_nll
from rledit.editing.update import FactoredUpdate
from rledit.errors import ConfigError
from rledit.models.capture import CapturedFactors, capture_factors

CAPTURE_TOKENS = ("target", "all")


class Editor(nn.Module, ABC):
    """Base class of every editor.

    `predict_update` captures keys and value gradients of the edit loss on the current model and turns
    them into a factored update; it never mutates the model. Hypernetwork editors keep the graph from
    their parameters to the update's factors so that training can back-propagate into them.
    """

    trainable: bool = False

    def __init__(self, module_shapes: Mapping[str, tuple[int, int]], capture_tokens: str = "target"):
        super().__init__()
        if capture_tokens not in CAPTURE_TOKENS:
            raise ConfigError(f"editor option capture_tokens={capture_tokens!r}: expected one of {CAPTURE_TOKENS}")
        self.module_shapes = {name: tuple(shape) for name, shape in module_shapes.items()}
        self.capture_tokens = capture_tokens

    def capture(self, model: nn.Module, modules: Mapping[str, nn.Module], batch) -> dict[str, CapturedFactors]:
        """One forward/backward of the edit loss on `batch` (a TokenizedBatch), recording K and G."""
        mask = batch.target_mask if self.capture_tokens == "target" else batch.attention_mask.bool()
        with torch.enable_grad(), capture_factors(modules, mask) as captured:
            target_nll(forward_logits(model, batch), batch.labels).backward()
        return captured.factors

    def predict_update(self, model: nn.Module, modules: Mapping[str, nn.Module], batch) -> FactoredUpdate:
        return self.update_from_factors(self.capture(model, modules, batch))

    @abstractmethod
    def update_from_factors(self, factors: Mapping[str, CapturedFactors]) -> FactoredUpdate:
        """Turn captured factors into a factored update (differentiable in the editor's parameters)."""

    def committed(self) -> None:
        """The update last predicted was committed. Editors that remember earlier edits record it here."""

    def reverted(self, k: int | None = None) -> None:
        """The last `k` commits were reverted; None: all of them, the weights are the originals and a new
        edit sequence starts (also said when a session or a training rollout begins)."""

    def extra_config(self) -> dict:
        """Constructor arguments beyond module_shapes and capture_tokens, to rebuild the editor."""
        return {}

    def config(self) -> dict:
        return {"module_shapes": {n: list(s) for n, s in self.module_shapes.items()},
                "capture_tokens": self.capture_tokens, **self.extra_config()}
