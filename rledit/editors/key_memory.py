"""The keys earlier edits of a sequence wrote to, remembered so that later edits keep them.

A ridge solve regularised only by e^lambda I maps each new key to its shift and moves every other
direction its keys span, including the keys of edits committed before: over a long sequence later edits
overwrite earlier ones. Adding the (weighted) Gram matrix of the committed keys to the regulariser makes
each solve also keep the outputs at those keys: recursive least squares over the whole sequence.
"""

from __future__ import annotations

import torch


class KeyMemory:
    """Per module: the keys of every committed step (for exact revert) and their weighted Gram matrix."""

    def __init__(self, weight: float):
        if weight <= 0:
            raise ValueError(f"key memory weight must be > 0, got {weight}")
        self.weight = weight
        self.pending: dict[str, torch.Tensor] = {}
        self.steps: list[dict[str, torch.Tensor]] = []
        self.gram: dict[str, torch.Tensor] = {}

    def propose(self, name: str, keys: torch.Tensor) -> None:
        """Keys of one round of the update being predicted; they count once that update is committed."""
        keys = keys.detach()
        self.pending[name] = keys if name not in self.pending else torch.cat([self.pending[name], keys])

    def discard_pending(self) -> None:
        """A new update begins: the rounds of one that was never committed are forgotten."""
        self.pending = {}

    def regulariser(self, name: str) -> torch.Tensor | None:
        """The weighted Gram of the committed keys and of the earlier rounds of the update being predicted."""
        gram = self.gram.get(name)
        if name in self.pending:
            gram = (0 if gram is None else gram) + self._weighted_gram(self.pending[name])
        return gram

    def commit(self) -> None:
        if self.pending:
            self.steps.append(self.pending)
            self._add(self.pending)
        self.pending = {}

    def revert(self, k: int | None = None) -> None:
        """Forget the last `k` committed steps (None: all); the Gram is rebuilt from what remains."""
        self.pending = {}
        keep = 0 if k is None else max(len(self.steps) - k, 0)
        del self.steps[keep:]
        self.gram = {}
        for step in self.steps:
            self._add(step)

    def _add(self, step: dict[str, torch.Tensor]) -> None:
        """Fold one step's keys into the weighted Gram matrices."""
        for name, keys in step.items():
            self.gram[name] = self.gram.get(name, 0) + self._weighted_gram(keys)

    def _weighted_gram(self, keys: torch.Tensor) -> torch.Tensor:
        keys = keys.float()
        return self.weight * keys.T @ keys
