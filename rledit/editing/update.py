"""Factored low-rank updates: dW = alpha * P^T diag(s) Q, never a dense matrix until committed."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from rledit.errors import EditRefusedError


@dataclass
class ModuleUpdate:
    """The update of one linear module, in the module's (d_out x d_in) orientation.

    P: (N, d_out), Q: (N, d_in), scale s: (N,) or None (all ones). Rows where `row_mask` is False
    (padding) contribute nothing.
    """

    P: torch.Tensor
    Q: torch.Tensor
    scale: torch.Tensor | None = None
    alpha: float = 1.0
    row_mask: torch.Tensor | None = None

    def masked_scale(self) -> torch.Tensor:
        """s with masked rows zeroed (ones when no scale is given)."""
        s = torch.ones(self.P.shape[0], dtype=torch.float32, device=self.P.device) if self.scale is None \
            else self.scale.float()
        return s if self.row_mask is None else s * self.row_mask.to(s.dtype)

    def effective_scale(self) -> torch.Tensor:
        """alpha * s with masked rows zeroed: the per-row weight of P^T diag(.) Q."""
        return self.masked_scale() * self.alpha

    def dense(self) -> torch.Tensor:
        """The dense (d_out x d_in) update in fp32: for tests and references only."""
        return (self.P.float().T * self.effective_scale()) @ self.Q.float()

    def frobenius_sq(self) -> torch.Tensor:
        """||P^T diag(s) Q||_F^2 computed in N x N space: tr((P' P'^T)(Q Q^T)) with P' = diag(s) P."""
        Ps = self.P * self.effective_scale().to(self.P.dtype)[:, None]
        return ((Ps @ Ps.T) * (self.Q @ self.Q.T)).sum()

    def is_finite(self) -> bool:
        tensors = [self.P, self.Q] + ([self.scale] if self.scale is not None else [])
        return all(bool(torch.isfinite(t).all()) for t in tensors) and bool(
            torch.isfinite(torch.tensor(self.alpha)))

    def detach(self) -> ModuleUpdate:
        return ModuleUpdate(self.P.detach(), self.Q.detach(),
                            None if self.scale is None else self.scale.detach(), float(self.alpha),
                            self.row_mask)


FactoredUpdate = dict[str, ModuleUpdate]
"""Module name (as in `model.named_modules()`) -> its update."""


def concat_updates(first: FactoredUpdate, second: FactoredUpdate) -> FactoredUpdate:
    """The update that applies both: each module's rows appended (alpha and row masks folded into the scale)."""
    def concat(a: ModuleUpdate | None, b: ModuleUpdate) -> ModuleUpdate:
        if a is None:
            return b
        return ModuleUpdate(torch.cat([a.P, b.P.to(a.P.dtype)]), torch.cat([a.Q, b.Q.to(a.Q.dtype)]),
                            torch.cat([a.effective_scale(), b.effective_scale()]))

    return {**first, **{name: concat(first.get(name), update) for name, update in second.items()}}


def row_clamp_factors(rows: torch.Tensor, limits: torch.Tensor) -> torch.Tensor:
    """(N, 1) factors that scale each row of `rows` down to norm `limits` (N or N x 1) where it is longer."""
    return (limits.reshape(-1, 1) / rows.norm(dim=-1, keepdim=True).clamp(min=1e-12)).clamp(max=1.0)


def non_finite(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """The labels of `tensors` that hold a NaN or an inf (one host sync for all of them)."""
    if not tensors:
        return []
    finite = torch.stack([torch.isfinite(t).all() for t in tensors.values()]).tolist()
    return [label for label, ok in zip(tensors, finite) if not ok]


def refuse_non_finite(what: str, tensors: Mapping[str, torch.Tensor]) -> None:
    """Raise EditRefusedError, prefixed by `what`, naming every tensor of `tensors` that holds a NaN or an inf."""
    bad = non_finite(tensors)
    if bad:
        raise EditRefusedError(f"{what}: non-finite {', '.join(bad)}")


def check_finite(update: FactoredUpdate) -> None:
    """Refuse an update holding NaN or inf, naming the modules at fault."""
    bad = [name for name, u in update.items() if not u.is_finite()]
    if bad:
        raise EditRefusedError(f"update refused: non-finite values in the factors of {', '.join(bad)}; "
                               "the model was not changed")
