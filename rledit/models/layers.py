"""Layer specs: name the modules to edit the way papers list them, then resolve them on a model.

A spec is a module name with brace groups: `{11-15}` is an inclusive integer range, `{a,b}` a list of
alternatives, and alternatives may themselves hold ranges or groups (`transformer.h.{1,3,5-7}.mlp.c_fc`).
Several groups multiply out: `model.layers.{22-30}.mlp.{gate_proj,up_proj}` names 18 modules.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from rledit.errors import LayerSpecError

RANGE = re.compile(r"([0-9]+)-([0-9]+)")  # ASCII digits only: int() would also read other scripts' digits
MAX_NAMES = 100_000  # far beyond any model's module count: more is a typo that would exhaust memory
MAX_BOUND_DIGITS = 9  # longer range bounds are typos too (and int() refuses bounds over 4,300 digits)


@dataclass(frozen=True)
class EditableModule:
    """A module an editor may change, with its shape in the (d_out x d_in) orientation editors work in.

    GPT-2's Conv1D stores its weight as (d_in x d_out), nn.Linear as (d_out x d_in); `transposed`
    records which, so that downstream code never has to ask.
    """

    name: str
    module: nn.Module
    d_in: int
    d_out: int
    transposed: bool

    @classmethod
    def of(cls, name: str, module: nn.Module) -> EditableModule:
        if isinstance(module, nn.Linear):
            return cls(name, module, module.in_features, module.out_features, transposed=False)
        if isinstance(module, Conv1D):
            d_in, d_out = module.weight.shape
            return cls(name, module, d_in, d_out, transposed=True)
        raise LayerSpecError(f"module {name!r} is a {type(module).__name__}, not an editable linear map "
                             f"(nn.Linear or Conv1D)")

    def weight_view(self) -> torch.Tensor:
        """The weight as a (d_out x d_in) view sharing storage with the module's parameter."""
        weight = self.module.weight
        return weight.T if self.transposed else weight


def expand_layer_spec(spec: str) -> list[str]:
    """All module names a spec denotes, in the order written (first group varies slowest), without repeats."""
    if not isinstance(spec, str) or not spec.strip():
        raise LayerSpecError(f"layer spec {spec!r} is empty")
    try:
        return list(dict.fromkeys(_expand(spec, spec)))
    except RecursionError:  # each group nests one level deeper, so thousands of them exhaust the stack
        raise LayerSpecError(f"layer spec {spec!r} has too many brace groups") from None


def resolve_edit_modules(model: nn.Module, specs: str | Sequence[str]) -> dict[str, EditableModule]:
    """The modules named by `specs`, keyed by name, in the model's own module order.

    Fails on the first name that matches no module, listing the closest existing names.
    """
    specs = [specs] if isinstance(specs, str) else list(specs)
    if not specs:
        raise LayerSpecError("no layer specs given: an editor needs at least one module to edit")
    modules = dict(model.named_modules())
    selected: set[str] = set()
    for spec in specs:
        for name in expand_layer_spec(spec):
            if name not in modules:
                raise LayerSpecError(_no_match_message(spec, name, list(modules)))
            selected.add(name)
    return {name: EditableModule.of(name, module) for name, module in modules.items() if name in selected}


def _no_match_message(spec: str, name: str, module_names: list[str]) -> str:
    near = difflib.get_close_matches(name, module_names, n=5, cutoff=0.6)
    hint = f"near matches: {', '.join(near)}" if near else "no similar module names"
    where = f"layer spec {spec!r}" if name == spec else f"layer spec {spec!r} (expanded name {name!r})"
    return f"{where} matches no module of the model; {hint}"


def _expand(text: str, spec: str) -> list[str]:
    """Brace-expand `text`, a piece of `spec` (named in errors)."""
    open_at, close_at = text.find("{"), text.find("}")
    if open_at < 0:
        if close_at >= 0:
            raise LayerSpecError(f"layer spec {spec!r}: unbalanced '}}'")
        return [text]
    if 0 <= close_at < open_at:
        raise LayerSpecError(f"layer spec {spec!r}: unbalanced '}}'")
    end = _matching_brace(text, open_at, spec)
    prefix, body, suffix = text[:open_at], text[open_at + 1:end], text[end + 1:]
    alternatives = [name for part in _split_top_level(body) for name in _expand_alternative(part, spec)]
    tails = _expand(suffix, spec)
    if len(alternatives) * len(tails) > MAX_NAMES:
        raise LayerSpecError(f"layer spec {spec!r} names more than {MAX_NAMES} modules")
    return [prefix + alternative + tail for alternative in alternatives for tail in tails]


def _expand_alternative(part: str, spec: str) -> list[str]:
    part = part.strip()
    if not part:
        raise LayerSpecError(f"layer spec {spec!r}: empty alternative in a brace group")
    if match := RANGE.fullmatch(part):
        if max(len(match[1]), len(match[2])) > MAX_BOUND_DIGITS:
            raise LayerSpecError(f"layer spec {spec!r}: range {part!r} has a bound over "
                                 f"{MAX_BOUND_DIGITS} digits")
        first, last = int(match[1]), int(match[2])
        if first > last:
            raise LayerSpecError(f"layer spec {spec!r}: reversed range {part!r}")
        if last - first >= MAX_NAMES:
            raise LayerSpecError(f"layer spec {spec!r}: range {part!r} names more than {MAX_NAMES} modules")
        return [str(i) for i in range(first, last + 1)]
    return _expand(part, spec)


def _matching_brace(text: str, open_at: int, spec: str) -> int:
    depth = 0
    for i in range(open_at, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return i
    raise LayerSpecError(f"layer spec {spec!r}: unbalanced '{{'")


def _split_top_level(body: str) -> list[str]:
    """Split a group's body on the commas that are not inside a nested group."""
    parts, depth, start = [], 0, 0
    for i, char in enumerate(body):
        depth += {"{": 1, "}": -1}.get(char, 0)
        if char == "," and depth == 0:
            parts.append(body[start:i])
            start = i + 1
    parts.append(body[start:])
    return parts
