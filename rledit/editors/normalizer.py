"""Running per-feature mean/variance of hypernetwork inputs, merged a whole batch at a time.

The statistics are buffers, so they travel with `state_dict()` into checkpoints. They keep updating
while editing at test time by default ("lifelong normalization"): over long edit sequences the input
distribution drifts, and stale statistics hurt.
"""

from __future__ import annotations

import torch
from torch import nn


class RunningNormalizer(nn.Module):
    """Normalizes z (N, dim) feature-wise with statistics of every batch observed so far.

    The variance is the unbiased one (divides by count - 1). Statistics are fp64 (the count int64) so
    that thousands of merges do not drift; with fewer than two observed rows the normalizer is the
    identity (mean 0, std 1). `eps` is tiny because value gradients can have variances far below 1e-8.
    """

    def __init__(self, dim: int, eps: float = 1e-16, update_during_edit: bool = True, enabled: bool = True):
        super().__init__()
        self.dim, self.eps = dim, eps
        self.update_during_edit = update_during_edit
        self.enabled = enabled
        self.register_buffer("count", torch.zeros((), dtype=torch.int64))
        self.register_buffer("mean", torch.zeros(dim, dtype=torch.float64))
        self.register_buffer("m2", torch.zeros(dim, dtype=torch.float64))

    def reset(self) -> None:
        """Forget every observation."""
        self.count.zero_()
        self.mean.zero_()
        self.m2.zero_()

    def _check(self, z: torch.Tensor, mask: torch.Tensor | None) -> None:
        if z.dim() != 2 or z.shape[1] != self.dim:
            raise ValueError(f"RunningNormalizer expects a (N, {self.dim}) batch, got shape {tuple(z.shape)}")
        if mask is not None and mask.shape != z.shape[:1]:
            raise ValueError(f"row mask must have shape ({z.shape[0]},), got {tuple(mask.shape)}")

    @torch.no_grad()
    def observe(self, z: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Merge the rows of z (those where `mask` is True) into the statistics (Chan et al.).

        Rows holding a NaN or an inf are left out: one poisoned row would make every later statistic NaN.
        Weighted sums instead of boolean indexing: no host synchronisation on an accelerator, and a batch
        left with no row (all masked, all non-finite or empty) leaves the statistics unchanged.
        """
        self._check(z, mask)
        z = z.detach().to(torch.float64)
        finite_rows = torch.isfinite(z).all(dim=1)
        z = torch.where(finite_rows[:, None], z, 0.0)  # a zero weight alone would still let 0 * inf = NaN in
        weight = finite_rows.to(torch.float64)
        if mask is not None:
            weight = weight * mask.to(device=z.device, dtype=torch.float64)
        n_batch = weight.sum()
        batch_mean = (weight @ z) / n_batch.clamp_min(1.0)
        batch_m2 = weight @ (z - batch_mean).square()
        self.merge(n_batch, batch_mean, batch_m2)

    @torch.no_grad()
    def merge(self, n: torch.Tensor, mean: torch.Tensor, m2: torch.Tensor) -> None:
        """Add the moments of `n` more rows (Chan et al.'s pairwise update: exact in any order of merges)."""
        n_old = self.count.to(torch.float64)
        total = n_old + n
        delta = mean - self.mean
        self.mean += delta * (n / total.clamp_min(1.0))
        self.m2 += m2 + delta.square() * (n_old * n / total.clamp_min(1.0))
        self.count += n.round().to(torch.int64)

    def variance(self) -> torch.Tensor:
        """Unbiased per-feature variance (zeros while fewer than two rows were observed)."""
        return self.m2 / (self.count.to(torch.float64) - 1.0).clamp_min(1.0)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """(z - mean) / sqrt(var + eps) in z's dtype (at least fp32 inside); the identity when disabled."""
        if not self.enabled:
            return z
        self._check(z, None)
        ready = self.count >= 2
        mean = torch.where(ready, self.mean, torch.zeros_like(self.mean))
        std = torch.where(ready, (self.variance() + self.eps).sqrt(), torch.ones_like(self.mean))
        compute_dtype = torch.promote_types(z.dtype, torch.float32)
        return ((z.to(compute_dtype) - mean.to(compute_dtype)) / std.to(compute_dtype)).to(z.dtype)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, eps={self.eps}, update_during_edit={self.update_during_edit}, enabled={self.enabled}"
