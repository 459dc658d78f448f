"""Triton kernel for ``master += alpha * P^T diag(scale) Q; weight <- cast(master)`` in one pass over W.

Each program owns one (BLOCK_M x BLOCK_N) tile of the d_out x d_in weight: it reduces over the N
factor rows in BLOCK_K chunks with an fp32 ``tl.dot`` (IEEE precision, no TF32), then reads the
master tile once, adds, and writes both master and the cast weight. No dense update ever exists
in memory and every weight element is read and written exactly once.

``TRITON_INTERPRET`` is read by every ``@triton.jit`` decoration, and Triton decorates its own
standard library (``tl.zeros`` ...) when ``triton`` is imported: to run this kernel on CPU tensors the
variable must be 1 before ``triton`` is first imported in the process.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

BLOCK_M = 64
BLOCK_N = 64
BLOCK_K = 32


def is_interpreted() -> bool:
    """True when the kernel below was built by the Triton interpreter (so it runs on CPU tensors)."""
    return isinstance(_lowrank_update_kernel, InterpretedFunction)


@triton.jit
def _lowrank_update_kernel(
    master_ptr, weight_ptr, p_ptr, q_ptr, scale_ptr, mask_ptr,
    d_out, d_in, n_rows, alpha,
    stride_master_m, stride_master_n, stride_weight_m, stride_weight_n,
    stride_p_k, stride_p_m, stride_q_k, stride_q_n, stride_scale, stride_mask,
    HAS_WEIGHT: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_MASK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # int64 indices: rows * stride can exceed 2**31 on the largest embedding matrices.
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < d_out
    col_ok = cols < d_in

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, n_rows, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < n_rows
        if HAS_MASK:
            # Masked factor rows are never loaded (they may hold padding garbage, even NaN).
            k_ok = k_ok & (tl.load(mask_ptr + ks * stride_mask, mask=k_ok, other=0) != 0)
        p_t = tl.load(p_ptr + ks[None, :] * stride_p_k + rows[:, None] * stride_p_m,
                      mask=row_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
        if HAS_SCALE:
            s = tl.load(scale_ptr + ks * stride_scale, mask=k_ok, other=0.0).to(tl.float32)
            p_t = p_t * s[None, :]
        q = tl.load(q_ptr + ks[:, None] * stride_q_k + cols[None, :] * stride_q_n,
                    mask=k_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
        acc = tl.dot(p_t, q, acc, input_precision="ieee")

    tile_ok = row_ok[:, None] & col_ok[None, :]
    master_tile = master_ptr + rows[:, None] * stride_master_m + cols[None, :] * stride_master_n
    updated = tl.load(master_tile, mask=tile_ok) + alpha * acc
    tl.store(master_tile, updated, mask=tile_ok)
    if HAS_WEIGHT:
        weight_tile = weight_ptr + rows[:, None] * stride_weight_m + cols[None, :] * stride_weight_n
        tl.store(weight_tile, updated.to(weight_ptr.dtype.element_ty), mask=tile_ok)


def triton_lowrank_update_(master: torch.Tensor, weight: torch.Tensor | None, P: torch.Tensor,
                           Q: torch.Tensor, scale: torch.Tensor | None, alpha: float,
                           row_mask: torch.Tensor | None) -> None:
    """Launch the kernel on already validated tensors (see ``rledit.kernels.lowrank``)."""
    d_out, d_in = master.shape
    n_rows = P.shape[0]
    # Unused pointer arguments still need a tensor; the constexpr flags keep them untouched.
    weight_arg = master if weight is None else weight
    scale_arg = P if scale is None else scale
    mask_arg = P if row_mask is None else row_mask.view(torch.uint8)
    grid = (triton.cdiv(d_out, BLOCK_M), triton.cdiv(d_in, BLOCK_N))
    _lowrank_update_kernel[grid](
        master, weight_arg, P, Q, scale_arg, mask_arg,
        d_out, d_in, n_rows, float(alpha),
        master.stride(0), master.stride(1), weight_arg.stride(0), weight_arg.stride(1),
        P.stride(0), P.stride(1), Q.stride(0), Q.stride(1), scale_arg.stride(0), mask_arg.stride(0),
        HAS_WEIGHT=weight is not None, HAS_SCALE=scale is not None, HAS_MASK=row_mask is not None,
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
    )
