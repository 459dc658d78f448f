"""Ridge least squares for value shifts, primal or dual, returned as a factored update.

Find S minimising ||K S - D||^2 + e^lambda ||S||^2 and apply W <- W + S^T. By the push-through identity
S = (K^T K + e^lambda I)^-1 K^T D = K^T (K K^T + e^lambda I)^-1 D. The dual form solves an N x N system
and is already factored (P = (K K^T + e^lambda I)^-1 D, Q = K); the primal form solves a d_in x d_in one
(P = S, Q = I), cheaper once N >= d_in. Both solve in fp32 (fp64 when given fp64) by Cholesky, with jitter if needed.
Non-finite inputs (or a system that overflows) refuse the edit at once: no jitter makes such a system solvable.

With a memory M of earlier edits' keys (a d_in x d_in Gram matrix) the regulariser becomes R = e^lambda I + M:
the update then also keeps the outputs of the keys earlier edits wrote. Still rank N:
S = R^-1 K^T (K R^-1 K^T + I)^-1 D, so P = (K R^-1 K^T + I)^-1 D and Q = K R^-1. A preserved-knowledge
prior (MEMIT's weight x C over generic text) enters R the same way, keeping the outputs at generic keys.

With AlphaEdit's null-space projector Pn the update is confined to dW = dW Pn: the solve sees the keys
K Pn (and Pn M Pn, Pn prior Pn), and Q becomes Q Pn. Still rank N.
"""

from __future__ import annotations

import torch

from rledit.editing.update import ModuleUpdate, refuse_non_finite


def spd_solve(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """Solve A X = B for symmetric positive definite A, adding diagonal jitter until Cholesky succeeds.

    A LinAlgError means a finite system that is not positive definite; a non-finite one is refused (with
    `ridge_update`'s inputs checked first, that is one whose forming overflowed).
    """
    refuse_non_finite("ridge solve refused", {"system matrix": A, "right-hand side": B})
    eye = torch.eye(A.shape[0], dtype=A.dtype, device=A.device)
    jitter = 0.0
    scale = A.diagonal().abs().mean().clamp(min=torch.finfo(A.dtype).tiny)
    for _ in range(6):
        L, info = torch.linalg.cholesky_ex(A + jitter * scale * eye)
        if int(info) == 0:
            return torch.cholesky_solve(B, L)
        jitter = 1e-6 if jitter == 0.0 else jitter * 10
    raise torch.linalg.LinAlgError("ridge system is not positive definite even with jitter")


def ridge_update(keys: torch.Tensor, value_shifts: torch.Tensor, ridge: torch.Tensor, form: str = "auto",
                 memory: torch.Tensor | None = None, prior: torch.Tensor | None = None,
                 projector: torch.Tensor | None = None) -> ModuleUpdate:
    """The factored update S^T for keys K (N x d_in), shifts D (N x d_out) and ridge e^lambda (a scalar).

    `memory` (earlier edits' key Gram) and `prior` (preserved knowledge) are d_in x d_in terms of the
    regulariser; `projector` confines the update to its range. form: "dual", "primal" or "auto" (dual when
    N < d_in); ignored when the regulariser has a memory or prior term.
    """
    optional = {"key memory": memory, "preserved-knowledge prior": prior, "null-space projector": projector}
    inputs = {"keys": keys, "value shifts": value_shifts, "ridge": ridge}
    refuse_non_finite("ridge solve refused", inputs | {k: v for k, v in optional.items() if v is not None})
    dtype = torch.promote_types(keys.dtype, torch.float32)
    K, D = keys.to(dtype), value_shifts.to(dtype)
    n, d_in = K.shape
    terms = [t.to(dtype) for t in (memory, prior) if t is not None]
    if projector is not None:
        Pn = projector.to(dtype)
        K, terms = K @ Pn, [Pn @ t @ Pn for t in terms]
    if terms:
        R = sum(terms) + ridge * torch.eye(d_in, dtype=K.dtype, device=K.device)
        Q = spd_solve(R, K.T).T
        update = ModuleUpdate(P=spd_solve(Q @ K.T + torch.eye(n, dtype=K.dtype, device=K.device), D), Q=Q)
    else:
        if form == "auto":
            form = "dual" if n < d_in else "primal"
        if form == "dual":
            A = K @ K.T + ridge * torch.eye(n, dtype=K.dtype, device=K.device)
            update = ModuleUpdate(P=spd_solve(A, D), Q=K)
        elif form == "primal":
            eye = torch.eye(d_in, dtype=K.dtype, device=K.device)
            update = ModuleUpdate(P=spd_solve(K.T @ K + ridge * eye, K.T @ D), Q=eye)
        else:
            raise ValueError(f"ridge form {form!r}: expected 'dual', 'primal' or 'auto'")
    return update if projector is None else ModuleUpdate(P=update.P, Q=update.Q @ Pn)
