"""Factor capture: the keys (layer inputs) and value gradients (output gradients) of edited modules.

The weight gradient of a linear module is `G^T K`, of rank <= N (the number of selected tokens), so
keeping K and G is enough to build any of the editors' updates: no per-token outer products and no
dense gradient are ever formed. Model parameters stay frozen; the output of each edited module is
made a graph root when nothing upstream needs a gradient, so layers below the first edited module
do no gradient work.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class CapturedFactors:
    """Keys K (N x d_in), value gradients G (N x d_out) and output norms (N,) at the selected tokens.

    The output norms give editors the scale of the module's activations, from which an untrained
    editor's step size is set so that its first edit is a real one.
    """

    keys: torch.Tensor
    grads: torch.Tensor
    output_norms: torch.Tensor

    @property
    def num_tokens(self) -> int:
        return self.keys.shape[0]


class FactorCapture:
    """Collects factors during one forward/backward; read `factors` after the backward."""

    def __init__(self, names: list[str]):
        self._keys: dict[str, torch.Tensor] = {}
        self._grads: dict[str, torch.Tensor] = {}
        self._output_norms: dict[str, torch.Tensor] = {}
        self._names = names

    @property
    def factors(self) -> dict[str, CapturedFactors]:
        missing = [n for n in self._names if n not in self._grads]
        if missing:
            raise RuntimeError(f"no gradient was captured for {', '.join(missing)}: run the edit loss's "
                               "backward inside the capture block")
        return {n: CapturedFactors(self._keys[n], self._grads[n], self._output_norms[n]) for n in self._names}


@contextmanager
def capture_factors(modules: Mapping[str, nn.Module], token_mask: torch.Tensor | None) -> Iterator[FactorCapture]:
    """Record K and G of `modules` at the tokens where `token_mask` (B x T bool) is True (None: all tokens).

    Run exactly one forward and one backward of the edit loss inside the block.
    """
    capture = FactorCapture(list(modules))
    handles = []

    def select(t: torch.Tensor) -> torch.Tensor:
        flat = t.reshape(-1, t.shape[-1])
        return flat if token_mask is None else flat[token_mask.reshape(-1).to(flat.device)]

    def make_hook(name: str):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
            capture._keys[name] = select(args[0].detach()).float()
            capture._output_norms[name] = select(output.detach()).float().norm(dim=-1)
            if not output.requires_grad:
                output = output.detach().requires_grad_(True)

            def keep_grad(grad: torch.Tensor) -> None:
                capture._grads[name] = select(grad.detach()).float()

            output.register_hook(keep_grad)
            return output

        return hook

    try:
        for name, module in modules.items():
            handles.append(module.register_forward_hook(make_hook(name)))
        yield capture
    finally:
        for handle in handles:
            handle.remove()
