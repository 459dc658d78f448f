"""The keys earlier edits of a sequence wrote to, remembered so that later edits keep them.

A ridge solve regularised only by e^lambda I maps each new key to its shift and moves every other
direction its keys span, including the keys of edits committed before: over a long sequence later edits
overwrite earlier ones. Adding the (weighted) Gram matrix of the committed keys to the regulariser makes
each solve also keep the outputs at those keys: recursive least squares over the whole sequence.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class StepGram(NamedTuple):
    """A committed step's weighted key Gram, kept instead of its keys when it is the smaller of the two."""

    matrix: torch.Tensor


class KeyMemory:
    """Per module: what every committed step wrote (for exact revert) and the weighted Gram matrix of it all.

    A step is kept as its keys, or as its weighted Gram when it has more keys than they have dimensions (many
    rounds or long batches on a narrow module); revert rebuilds the same sums either way.
    """

    def __init__(self, weight: float):
        if weight <= 0:
            raise ValueError(f"key memory weight must be > 0, got {weight}")
        self.weight = weight
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_gram: dict[str, torch.Tensor] = {}  # running sum over the rounds, so a round costs its own keys
        self.steps: list[dict[str, torch.Tensor | StepGram]] = []
        self.gram: dict[str, torch.Tensor] = {}

    def propose(self, name: str, keys: torch.Tensor) -> None:
        """Keys of one round of the update being predicted; they count once that update is committed."""
        keys = keys.detach()
        self.pending[name] = keys if name not in self.pending else torch.cat([self.pending[name], keys])
        self.pending_gram[name] = self.pending_gram.get(name, 0) + self._weighted_gram(keys)

    def discard_pending(self) -> None:
        """A new update begins: the rounds of one that was never committed are forgotten."""
        self.pending, self.pending_gram = {}, {}

    def regulariser(self, name: str) -> torch.Tensor | None:
        """The weighted Gram of the committed keys and of the earlier rounds of the update being predicted."""
        gram = self.gram.get(name)
        if name in self.pending_gram:
            gram = (0 if gram is None else gram) + self.pending_gram[name]
        return gram

    def commit(self) -> None:
        if self.pending:
            step = {name: self._compact(name, keys) for name, keys in self.pending.items()}
            self.steps.append(step)
            self._add(step)
        self.pending, self.pending_gram = {}, {}

    def revert(self, k: int | None = None) -> None:
        """Forget the last `k` committed steps (None: all); the Gram is rebuilt from what remains."""
        self.pending, self.pending_gram = {}, {}
        keep = 0 if k is None else max(len(self.steps) - k, 0)
        del self.steps[keep:]
        self.gram = {}
        for step in self.steps:
            self._add(step)

    def _compact(self, name: str, keys: torch.Tensor) -> torch.Tensor | StepGram:
        return StepGram(self.pending_gram[name]) if keys.shape[0] > keys.shape[1] else keys

    def _add(self, step: dict[str, torch.Tensor | StepGram]) -> None:
        """Fold one step into the weighted Gram matrices."""
        for name, kept in step.items():
            gram = kept.matrix if isinstance(kept, StepGram) else self._weighted_gram(kept)
            self.gram[name] = self.gram.get(name, 0) + gram

    def _weighted_gram(self, keys: torch.Tensor) -> torch.Tensor:
        keys = keys.float()
        return self.weight * keys.T @ keys
