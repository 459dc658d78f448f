"""The fused low-rank weight update (Triton on CUDA, PyTorch elsewhere)."""

from rledit.kernels.lowrank import fused_lowrank_update_

__all__ = ["fused_lowrank_update_"]
