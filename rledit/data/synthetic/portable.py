"""Training whose weights do not depend on the CPU that runs it.

Pretraining is chaotic: a rounding difference of one unit in the last place grows over a few hundred
steps into another model, and CPUs round differently (vector width, BLAS blocking, vectorised exp/cos).
So the world model trains in float64 with its weights snapped to a fixed grid after every step. Two
CPUs then compute each update to within ~1e-16 and snap it to the same grid point, unless a value lands
within that distance of a rounding boundary, which is vanishingly rare at this grid. Everything that
would run in float32 inside the Hugging Face Llama (RMSNorm, the rotary table, the loss) runs in float64
here, and the rotary table is built from Python's `math` and snapped too.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaRMSNorm, LlamaRotaryEmbedding

from rledit.errors import ConfigError

# Weights are multiples of 2^-22: fine enough for Adam's smallest useful steps on this model, coarse
# enough that float64 disagreement (~1e-16) almost never straddles a grid boundary.
WEIGHT_GRID = 2.0 ** -22
# The rotary cos/sin table is snapped much finer: it is computed once and only its libm rounding differs.
ROTARY_GRID = 2.0 ** -40


def snap_(tensors: Iterable[torch.Tensor], grid: float = WEIGHT_GRID) -> None:
    """Round every value to the nearest multiple of `grid` in place (exact in float64 for grid = 2^-k)."""
    with torch.no_grad():
        for tensor in tensors:
            tensor.mul_(1 / grid).round_().mul_(grid)


class Float64RMSNorm(nn.Module):
    """LlamaRMSNorm without its float32 round trip; shares the original's weight (same state-dict key)."""

    def __init__(self, norm: LlamaRMSNorm):
        super().__init__()
        self.weight = norm.weight
        self.variance_epsilon = norm.variance_epsilon

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))


class RotaryTable(nn.Module):
    """The default rotary embedding's cos/sin, computed with Python's math and snapped, for every position."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        rope = getattr(config, "rope_parameters", None) or {"rope_theta": config.rope_theta,
                                                             **(config.rope_scaling or {})}
        if rope.get("rope_type", "default") != "default":
            raise ConfigError(f"the world model's pretraining supports only the default rotary embedding, "
                              f"got rope_type={rope['rope_type']!r}")
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        base = rope["rope_theta"]
        frequencies = [base ** (-2 * i / head_dim) for i in range(head_dim // 2)]
        angles = [[position * frequency for frequency in frequencies] * 2
                  for position in range(config.max_position_embeddings)]
        cos = torch.tensor([[math.cos(a) for a in row] for row in angles], dtype=torch.float64)
        sin = torch.tensor([[math.sin(a) for a in row] for row in angles], dtype=torch.float64)
        snap_([cos, sin], ROTARY_GRID)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cos[position_ids].to(x.dtype), self.sin[position_ids].to(x.dtype)


def portable_llama(config: LlamaConfig) -> LlamaForCausalLM:
    """A freshly initialised float64 Llama with snapped weights and no float32 islands."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    for name, module in list(model.named_modules()):
        if isinstance(module, LlamaRMSNorm):
            model.set_submodule(name, Float64RMSNorm(module))
        elif isinstance(module, LlamaRotaryEmbedding):
            model.set_submodule(name, RotaryTable(config))
    snap_(model.parameters())
    return model


def standard_llama(portable: LlamaForCausalLM, config: LlamaConfig) -> LlamaForCausalLM:
    """The usual float32 Hugging Face Llama holding `portable`'s weights."""
    model = LlamaForCausalLM(config)
    model.load_state_dict({name: value.float() for name, value in portable.state_dict().items()})
    return model
