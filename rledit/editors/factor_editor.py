"""The factor-capturing family (MEND, MALMEN, RLEdit, training-free, fine-tuning): keys and value gradients
of the edit loss in, a factored update out."""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Mapping
from dataclasses import replace

import torch
from torch import nn

from rledit.editing.functional import functional_update
from rledit.editing.losses import forward_logits, target_nll
from rledit.editing.update import FactoredUpdate, concat_updates
from rledit.editors.base import Editor
from rledit.errors import ConfigError
from rledit.models.capture import CapturedFactors, capture_factors

CAPTURE_TOKENS = ("target", "all", "subject")


class FactorEditor(Editor):
    """Captures K and G of the edit loss on the current model and turns them into an update.

    Where: at the target tokens (`target`, the hypernetwork papers), at every token (`all`), or at each
    prompt's subject's last token (`subject`, where the locate-then-edit methods read their keys).

    Hypernetwork editors keep the graph from their parameters to the update's factors so that training can
    back-propagate into them.

    `rounds` > 1 captures and predicts again on the model with the earlier rounds' update applied, and
    commits the rounds' updates as one: a single step is linearised where the edit starts, and a far
    target (a new object) is reached by re-linearising, as the locate-then-edit methods optimise theirs.
    `round_decay` < 1 scales round r's update by round_decay^r: the first rounds travel, the later ones refine, as a
    decaying step size lets an optimiser settle instead of overshooting where the edit loss is curved.
    """

    def __init__(self, module_shapes: Mapping[str, tuple[int, int]], capture_tokens: str = "target",
                 rounds: int = 1, round_decay: float = 1.0):
        super().__init__(module_shapes)
        if capture_tokens not in CAPTURE_TOKENS:
            raise ConfigError(f"editor option capture_tokens={capture_tokens!r}: expected one of {CAPTURE_TOKENS}")
        if rounds < 1:
            raise ConfigError(f"editor option rounds={rounds}: need at least 1 round per edit batch")
        if not 0.0 < round_decay <= 1.0:
            raise ConfigError(f"editor option round_decay={round_decay}: need 0 < round_decay <= 1")
        self.capture_tokens = capture_tokens
        self.needs_subject = capture_tokens == "subject"
        self.rounds = rounds
        self.round_decay = round_decay

    def capture(self, model: nn.Module, modules: Mapping[str, nn.Module], batch) -> dict[str, CapturedFactors]:
        """One forward/backward of the edit loss on `batch` (a TokenizedBatch), recording K and G."""
        if self.capture_tokens == "subject":
            self.check_subjects(batch)
            mask = torch.zeros_like(batch.target_mask)
            mask[torch.arange(batch.num_rows, device=mask.device), batch.subject_last] = True
        else:
            mask = batch.target_mask if self.capture_tokens == "target" else batch.attention_mask.bool()
        with torch.enable_grad(), capture_factors(modules, mask) as captured:
            target_nll(forward_logits(model, batch), batch.labels).backward()
        return captured.factors

    def predict_update(self, model: nn.Module, modules: Mapping[str, nn.Module], batch) -> FactoredUpdate:
        self.start_update()
        update: FactoredUpdate = {}
        for r in range(self.rounds):
            with functional_update(modules, {name: u.detach() for name, u in update.items()}):
                factors = self.capture(model, modules, batch)
            step = self.update_from_factors(factors)
            if r and self.round_decay != 1.0:
                step = {name: replace(u, alpha=u.alpha * self.round_decay ** r) for name, u in step.items()}
            update = concat_updates(update, step)
        return update

    def start_update(self) -> None:
        """A new update's first round begins (editors that remember its rounds forget an uncommitted one)."""

    @abstractmethod
    def update_from_factors(self, factors: Mapping[str, CapturedFactors]) -> FactoredUpdate:
        """Turn captured factors into a factored update (differentiable in the editor's parameters)."""

