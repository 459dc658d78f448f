"""Public entry point of the fused low-rank update: W_master += alpha * P^T diag(s) Q; W = cast(W_master).

This module validates the inputs (every mismatch names the tensor at fault), picks the backend and
holds the PyTorch path. The Triton kernel lives in ``rledit.kernels.triton_lowrank`` and is imported
only when it is used, so CPU-only installs never need Triton.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

from rledit.errors import ConfigError, KernelInputError
from rledit.threads import cpu_threads

BACKENDS = ("auto", "triton", "torch")
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def fused_lowrank_update_(master: torch.Tensor, weight: torch.Tensor | None, P: torch.Tensor,
                          Q: torch.Tensor, scale: torch.Tensor | None = None, alpha: float = 1.0,
                          row_mask: torch.Tensor | None = None, backend: str = "auto") -> None:
    """In place: master (fp32, d_out x d_in) += alpha * P^T diag(scale) Q; then weight <- cast(master).

    P: (N, d_out), Q: (N, d_in); rows with row_mask False are skipped. master and weight may be
    strided views (GPT-2's Conv1D passes transposed views). weight=None updates master only.
    backend: "auto" (Triton for CUDA tensors when available, else PyTorch), "triton", "torch".
    """
    _check_inputs(master, weight, P, Q, scale, row_mask)
    if resolve_backend(backend, master.device) == "triton":
        from rledit.kernels.triton_lowrank import triton_lowrank_update_

        triton_lowrank_update_(master, weight, P, Q, scale, alpha, row_mask)
    else:
        torch_lowrank_update_(master, weight, P, Q, scale, alpha, row_mask)


def torch_lowrank_update_(master: torch.Tensor, weight: torch.Tensor | None, P: torch.Tensor,
                          Q: torch.Tensor, scale: torch.Tensor | None, alpha: float,
                          row_mask: torch.Tensor | None) -> None:
    """PyTorch path: one in-place fp32 GEMM with beta=1, so BLAS accumulates straight into master.

    Only the (N x d) factors are copied, never a d_out x d_in update. (Row blocks, so that the cast reads
    a block while it is still in cache, were tried on CPU and were not faster.) On a CPU the GEMM runs on
    one thread: BLAS may split it differently for another thread count and round differently, and saved
    edits replayed in another process must give the weights they gave when committed.
    """
    if row_mask is not None:
        # Indexing drops the masked rows, so padding (even NaN) never enters the product.
        P, Q = P[row_mask], Q[row_mask]
        scale = None if scale is None else scale[row_mask]
    P = P.to(torch.float32)
    if scale is not None:
        P = P * scale.to(torch.float32)[:, None]
    with cpu_threads(1) if master.device.type == "cpu" else nullcontext():
        master.addmm_(P.T, Q.to(torch.float32), beta=1.0, alpha=alpha)
    if weight is not None:
        weight.copy_(master)


def resolve_backend(backend: str, device: torch.device) -> str:
    """The backend ("triton" or "torch") that runs for tensors on device.

    "triton" on CPU tensors is allowed only when the kernel was built by the Triton interpreter.
    """
    if backend not in BACKENDS:
        raise ConfigError(f"unknown fused low-rank backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "torch":
        return "torch"
    if backend == "auto":
        return "triton" if device.type == "cuda" and _triton_importable() else "torch"
    if not _triton_importable():
        raise ConfigError("backend 'triton' was requested but triton cannot be imported; "
                          "install rledit[triton] or use backend='torch'")
    from rledit.kernels.triton_lowrank import is_interpreted

    if device.type != "cuda" and not is_interpreted():
        raise ConfigError(f"backend 'triton' needs CUDA tensors (got {device.type}); to run the kernel on "
                          "CPU set TRITON_INTERPRET=1 before triton is first imported")
    return "triton"


def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _check_inputs(master: torch.Tensor, weight: torch.Tensor | None, P: torch.Tensor, Q: torch.Tensor,
                  scale: torch.Tensor | None, row_mask: torch.Tensor | None) -> None:
    """Raise KernelInputError naming the first tensor whose shape, dtype or device does not fit."""
    _expect(master, "master", ndim=2, dtypes=(torch.float32,), device=master.device)
    d_out, d_in = master.shape
    _expect(P, "P", ndim=2, dtypes=FLOAT_DTYPES, device=master.device)
    n_rows = P.shape[0]
    _expect_shape(P, "P", (n_rows, d_out))
    _expect(Q, "Q", ndim=2, dtypes=FLOAT_DTYPES, device=master.device)
    _expect_shape(Q, "Q", (n_rows, d_in))
    if weight is not None:
        _expect(weight, "weight", ndim=2, dtypes=FLOAT_DTYPES, device=master.device)
        _expect_shape(weight, "weight", (d_out, d_in))
    if scale is not None:
        _expect(scale, "scale", ndim=1, dtypes=FLOAT_DTYPES, device=master.device)
        _expect_shape(scale, "scale", (n_rows,))
    if row_mask is not None:
        _expect(row_mask, "row_mask", ndim=1, dtypes=(torch.bool,), device=master.device)
        _expect_shape(row_mask, "row_mask", (n_rows,))


def _expect(tensor: torch.Tensor, name: str, *, ndim: int, dtypes: tuple[torch.dtype, ...],
            device: torch.device) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise KernelInputError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.ndim != ndim:
        raise KernelInputError(f"{name} must be {ndim}-D, got shape {tuple(tensor.shape)}")
    if tensor.dtype not in dtypes:
        allowed = " or ".join(str(d).removeprefix("torch.") for d in dtypes)
        got = str(tensor.dtype).removeprefix("torch.")
        raise KernelInputError(f"{name} must have dtype {allowed}, got {got}")
    if tensor.device != device:
        raise KernelInputError(f"{name} is on {tensor.device} but master is on {device}")


def _expect_shape(tensor: torch.Tensor, name: str, shape: tuple[int, ...]) -> None:
    if tuple(tensor.shape) != shape:
        raise KernelInputError(f"{name} has shape {tuple(tensor.shape)}, expected {shape} "
                               "(P: N x d_out, Q: N x d_in, scale/row_mask: N, weight: like master)")
