"""AlphaEdit's null-space projector of preserved knowledge, for every editor that projects its updates.

An update W + dW with dW = dW P, where P projects onto the eigenvectors of C = E[k k^T] with (near-)zero
eigenvalues, leaves the outputs at preserved keys where they were, however many edits are made.
"""

from __future__ import annotations

import warnings

import torch

from rledit.errors import ConfigError

THRESHOLD_KINDS = ("relative", "absolute", "energy")


def check_threshold_kind(kind: str, option: str) -> None:
    """A ConfigError naming `option` unless `kind` is a threshold kind."""
    if kind not in THRESHOLD_KINDS:
        raise ConfigError(f"{option}={kind!r}: expected one of {THRESHOLD_KINDS}")


def nullspace_projector(name: str, C: torch.Tensor, threshold: float, kind: str = "relative") -> tuple[torch.Tensor, int]:
    """P = U0 U0^T (fp64) over the eigenvectors of C whose eigenvalues are below `threshold` (`relative`:
    times the largest eigenvalue, which no change of activation scale can empty; `absolute`: as given, the
    published code's 1e-2; `energy`: the smallest eigenvalues that together hold at most `threshold` of
    the trace, which a few outlier dimensions cannot inflate), and its rank. An empty projector is a
    ConfigError naming module `name`; one that keeps every direction protects nothing, which is warned about."""
    check_threshold_kind(kind, "null-space threshold kind")
    values, vectors = torch.linalg.eigh(C.double())
    if kind == "energy":
        kept = vectors[:, torch.cumsum(values.clamp_min(0), 0) <= threshold * values.clamp_min(0).sum()]
    else:
        kept = vectors[:, values < threshold * (values.max() if kind == "relative" else 1.0)]
    rank = kept.shape[1]
    if rank == 0:
        raise ConfigError(f"the null space of module '{name}' is empty at threshold {threshold} ({kind}; "
                          f"eigenvalues of C span {float(values.min()):.3g} .. {float(values.max()):.3g}): "
                          "every update would be zero")
    if rank == C.shape[0]:
        warnings.warn(f"the null-space projector of '{name}' keeps every direction (rank {rank}): it protects "
                      "nothing; lower the threshold", stacklevel=2)
    return kept @ kept.T, rank


def movable_share(projector: torch.Tensor, C: torch.Tensor) -> float:
    """tr(P C) / tr(C): the share of the energy of keys with second moment C that lies inside the projector's
    range, so that an update confined to it still moves their outputs (0 for an exact null space)."""
    C = C.double()
    return float((projector.double() * C).sum() / C.trace())
