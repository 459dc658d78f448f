"""Functional application of a factored update: forward hooks add the low-rank term, nothing is mutated.

For a module with output y = x W^T, the updated output is y + alpha * ((x Q^T) * s) P. Autograd reaches
P, Q and s directly, reverting is leaving the block, and the cost is O(N (d_in + d_out)) per token.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import nn

from rledit.editing.update import FactoredUpdate, ModuleUpdate


def lowrank_addend(x: torch.Tensor, update: ModuleUpdate) -> torch.Tensor:
    """alpha * ((x Q^T) * s) P for inputs x (..., d_in): the change of the module's output."""
    coeff = (x.to(update.Q.dtype) @ update.Q.T) * update.effective_scale().to(update.Q.dtype)
    return coeff @ update.P.to(coeff.dtype)


@contextmanager
def functional_update(modules: Mapping[str, nn.Module], update: FactoredUpdate) -> Iterator[None]:
    """Inside the block, each module named in `update` behaves as if its weight were W + dW."""
    unknown = sorted(set(update) - set(modules))
    if unknown:
        raise KeyError(f"update names modules that are not edited: {', '.join(unknown)}")
    handles = []

    def make_hook(module_update: ModuleUpdate):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
            return output + lowrank_addend(args[0], module_update).to(output.dtype)

        return hook

    try:
        for name, module_update in update.items():
            handles.append(modules[name].register_forward_hook(make_hook(module_update)))
        yield
    finally:
        for handle in handles:
            handle.remove()
