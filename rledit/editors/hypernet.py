"""Hypernetworks that transform captured factors (keys K, value gradients G) before aggregation.

One network per distinct weight shape, shared by every edited module of that shape; each module has its
own row in the per-module parameters (scale, shift, step size, ridge). Every network is the identity at
initialisation (the second low-rank factor is zero), so an untrained editor makes a plain gradient /
ridge step, and training only has to learn a correction.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import nn

from rledit.editors.normalizer import RunningNormalizer
from rledit.errors import ConfigError, LayerSpecError


class PerModuleAffine(nn.Module):
    """x * scale[m] + shift[m]: a learned feature-wise affine map per edited module m."""

    def __init__(self, n_modules: int, dim: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(n_modules, dim))
        self.shift = nn.Parameter(torch.zeros(n_modules, dim))

    def forward(self, x: torch.Tensor, module_index: int) -> torch.Tensor:
        return x * self.scale[module_index] + self.shift[module_index]


class LowRankReLU(nn.Module):
    """relu(x A B + b) with B = 0 and b = 0 at init, so its output starts at exactly zero.

    The ReLU is `clamp(min=0)`, whose subgradient at 0 is 1: at init every pre-activation is exactly 0,
    and torch.relu's zero subgradient there would leave B and b without gradient forever.
    """

    def __init__(self, dim: int, rank: int):
        super().__init__()
        self.A = nn.Parameter(torch.randn(dim, rank) / math.sqrt(dim))
        self.B = nn.Parameter(torch.zeros(rank, dim))
        self.b = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x @ self.A @ self.B + self.b).clamp(min=0)


class MendBlock(nn.Module):
    """MEND's residual block: x <- x s_m + h_m, then x <- x + relu(x A B + b)."""

    def __init__(self, dim: int, rank: int, n_modules: int):
        super().__init__()
        self.affine = PerModuleAffine(n_modules, dim)
        self.lowrank = LowRankReLU(dim, rank)

    def forward(self, x: torch.Tensor, module_index: int) -> torch.Tensor:
        x = self.affine(x, module_index)
        return x + self.lowrank(x)


class RidgeBlock(nn.Module):
    """MALMEN/RLEdit's residual block: x <- x + s_m * relu(x A B + b) + h_m."""

    def __init__(self, dim: int, rank: int, n_modules: int):
        super().__init__()
        self.lowrank = LowRankReLU(dim, rank)
        self.affine = PerModuleAffine(n_modules, dim)

    def forward(self, x: torch.Tensor, module_index: int) -> torch.Tensor:
        return x + self.affine(self.lowrank(x), module_index)


class _ResidualNet(nn.Module):
    """Residual blocks over z = [K, G] (width d_in + d_out), output split back into (K~, G~).

    Also holds each module's learned log step size `log_eta`, and the calibrated value it started from
    (`calibrated_log_eta`): their difference is what training learned, which a recalibration keeps.
    """

    block_type: type[nn.Module]

    def __init__(self, d_in: int, d_out: int, rank: int, n_modules: int, n_blocks: int = 1,
                 init_log_eta: float = 0.0):
        super().__init__()
        self.d_in, self.d_out = d_in, d_out
        self.blocks = nn.ModuleList(self.block_type(d_in + d_out, rank, n_modules) for _ in range(n_blocks))
        self.log_eta = nn.Parameter(torch.full((n_modules,), float(init_log_eta)))
        self.register_buffer("calibrated_log_eta", torch.full((n_modules,), float(init_log_eta)))

    def forward(self, z: torch.Tensor, module_index: int) -> tuple[torch.Tensor, torch.Tensor]:
        for block in self.blocks:
            z = block(z, module_index)
        return z[:, :self.d_in], z[:, self.d_in:]


class MendNet(_ResidualNet):
    """MEND: low-rank residual blocks on the combined [u, delta] input, per-module input scale/shift."""

    block_type = MendBlock


class RidgeNet(_ResidualNet):
    """MALMEN / RLEdit: residual blocks with per-module scale/shift after the ReLU, plus a learned
    log ridge `log_lambda` per module (the ridge of the least-squares aggregation is e^lambda)."""

    block_type = RidgeBlock

    def __init__(self, d_in: int, d_out: int, rank: int, n_modules: int, n_blocks: int = 1,
                 init_log_eta: float = 0.0, init_log_lambda: float = 0.0):
        super().__init__(d_in, d_out, rank, n_modules, n_blocks, init_log_eta)
        self.log_lambda = nn.Parameter(torch.full((n_modules,), float(init_log_lambda)))
        self.register_buffer("calibrated_log_lambda", torch.full((n_modules,), float(init_log_lambda)))


NETWORKS: dict[str, type[_ResidualNet]] = {"mend": MendNet, "ridge": RidgeNet}


def _group_key(shape: tuple[int, int]) -> str:
    """ModuleDict key of a (d_out, d_in) weight shape: a string without dots."""
    return f"{shape[0]}x{shape[1]}"


class HyperNetworkBank(nn.Module):
    """All hypernetworks of an editor: one network and one RunningNormalizer per distinct weight shape.

    Modules are addressed by their name in `model.named_modules()`. Within a shape group, a module's
    index into the per-module parameters is its rank in the sorted names of the group, so a bank rebuilt
    with the same shapes and options lines up with a saved `state_dict()` whatever the order of the names.
    """

    def __init__(self, module_shapes: Mapping[str, tuple[int, int]], net: str = "ridge", rank: int = 1,
                 n_blocks: int = 1, normalize: bool = True, update_during_edit: bool = True,
                 init_log_eta: float = 0.0, init_log_lambda: float = 0.0, eps: float = 1e-16):
        super().__init__()
        if net not in NETWORKS:
            raise ConfigError(f"unknown hypernetwork net={net!r}; choose one of {sorted(NETWORKS)}")
        if rank < 1 or n_blocks < 0:
            raise ConfigError(f"hypernetwork needs rank >= 1 and n_blocks >= 0, got rank={rank}, n_blocks={n_blocks}")
        if not module_shapes:
            raise ConfigError("hypernetwork bank needs at least one module to edit (module_shapes is empty)")
        self._shapes = {name: self._checked_shape(name, shape) for name, shape in module_shapes.items()}
        self._hparams = {"net": net, "rank": rank, "n_blocks": n_blocks, "normalize": normalize,
                         "update_during_edit": update_during_edit, "init_log_eta": init_log_eta,
                         "init_log_lambda": init_log_lambda, "eps": eps}

        groups: dict[str, list[str]] = {}
        for name in sorted(self._shapes):
            groups.setdefault(_group_key(self._shapes[name]), []).append(name)
        self._slots = {name: (key, index) for key, names in groups.items() for index, name in enumerate(names)}

        self.nets = nn.ModuleDict()
        self.normalizers = nn.ModuleDict()
        for key, names in groups.items():
            d_out, d_in = self._shapes[names[0]]
            ridge_args = {"init_log_lambda": init_log_lambda} if net == "ridge" else {}
            self.nets[key] = NETWORKS[net](d_in, d_out, rank, len(names), n_blocks,
                                           init_log_eta=init_log_eta, **ridge_args)
            self.normalizers[key] = RunningNormalizer(d_in + d_out, eps=eps, enabled=normalize,
                                                      update_during_edit=update_during_edit)

    @staticmethod
    def _checked_shape(name: str, shape: tuple[int, int]) -> tuple[int, int]:
        if len(shape) != 2 or any(int(d) != d or d < 1 for d in shape):
            raise ConfigError(f"module '{name}': weight shape must be two positive ints (d_out, d_in), got {shape}")
        return int(shape[0]), int(shape[1])

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._shapes)

    def shape_of(self, name: str) -> tuple[int, int]:
        """The (d_out, d_in) weight shape of an edited module."""
        return self._shapes[self._known(name)]

    def _known(self, name: str) -> str:
        if name not in self._shapes:
            raise LayerSpecError(f"no hypernetwork for module '{name}'; the bank edits {', '.join(self._shapes)}")
        return name

    def _slot(self, name: str) -> tuple[_ResidualNet, int]:
        """The module's shape-group network and its index into that network's per-module parameters."""
        key, index = self._slots[self._known(name)]
        return self.nets[key], index

    def forward(self, name: str, K: torch.Tensor, G: torch.Tensor,
                mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Transform one module's keys K (N, d_in) and value gradients G (N, d_out) into (K~, G~).

        Normalizes z = [K, G] with the shape group's statistics, observing the batch first (rows where
        `mask` is True) when training or when lifelong normalization is on. Computed in the network's
        parameter dtype; padded rows are transformed too (the aggregation masks them).
        """
        d_out, d_in = self.shape_of(name)
        if K.dim() != 2 or G.dim() != 2 or K.shape[1] != d_in or G.shape[1] != d_out or K.shape[0] != G.shape[0]:
            raise LayerSpecError(f"module '{name}': expected keys (N, {d_in}) and value gradients (N, {d_out}), "
                                 f"got {tuple(K.shape)} and {tuple(G.shape)}")
        net, index = self._slot(name)
        normalizer = self.normalizers[_group_key((d_out, d_in))]
        z = torch.cat([K, G], dim=1).to(net.log_eta.dtype)
        if normalizer.enabled and (self.training or normalizer.update_during_edit):
            normalizer.observe(z, mask)
        return net(normalizer(z), index)

    def log_eta(self, name: str) -> torch.Tensor:
        """The module's learned log step size (a scalar that carries gradient)."""
        net, index = self._slot(name)
        return net.log_eta[index]

    def log_lambda(self, name: str) -> torch.Tensor:
        """The module's learned log ridge (ridge networks only)."""
        net, index = self._ridge_slot(name)
        return net.log_lambda[index]

    def _ridge_slot(self, name: str) -> tuple[RidgeNet, int]:
        net, index = self._slot(name)
        if not isinstance(net, RidgeNet):
            raise ConfigError(f"module '{name}': log_lambda exists only for net='ridge', this bank uses "
                              f"net={self._hparams['net']!r}")
        return net, index

    @torch.no_grad()
    def calibrate_log_eta(self, name: str, value: float) -> None:
        """Move a module's log step size to `value` (from the scale of its captured factors) plus whatever
        training has added since its last calibration."""
        net, index = self._slot(name)
        _recalibrate(net.log_eta, net.calibrated_log_eta, index, value)

    @torch.no_grad()
    def calibrate_log_lambda(self, name: str, value: float) -> None:
        """As `calibrate_log_eta`, for the log ridge."""
        net, index = self._ridge_slot(name)
        _recalibrate(net.log_lambda, net.calibrated_log_lambda, index, value)


def _recalibrate(learned: torch.Tensor, calibrated: torch.Tensor, index: int, value: float) -> None:
    learned[index] += value - calibrated[index]
    calibrated[index] = value
