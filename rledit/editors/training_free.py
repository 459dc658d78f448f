"""A training-free editor (UltraEdit-style): the ridge path with the identity network and lifelong normalization."""

from __future__ import annotations

from collections.abc import Mapping

from rledit.editors.ridge import RidgeEditor


class TrainingFreeEditor(RidgeEditor):
    """What RLEdit is at initialization: no learned network, step size and ridge fixed after calibration."""

    trainable = False

    def __init__(self, module_shapes: Mapping[str, tuple[int, int]], capture_tokens: str = "target",
                 normalize: bool = True, lifelong_norm: bool = True, init_shift: float = 1.0,
                 init_ridge: float = 0.1, edit_memory: float = 0.0, norm_per_sequence: bool = False,
                 preserve_weight: float = 0.0, nullspace_threshold: float | None = None,
                 threshold_kind: str = "relative", rounds: int = 1, clamp_norm: float | None = None,
                 round_decay: float = 1.0):
        super().__init__(module_shapes, capture_tokens, rank=1, n_blocks=0, normalize=normalize,
                         lifelong_norm=lifelong_norm, init_shift=init_shift, init_ridge=init_ridge,
                         edit_memory=edit_memory, norm_per_sequence=norm_per_sequence,
                         preserve_weight=preserve_weight, nullspace_threshold=nullspace_threshold,
                         threshold_kind=threshold_kind, rounds=rounds, clamp_norm=clamp_norm,
                         round_decay=round_decay)
        self.requires_grad_(False)

