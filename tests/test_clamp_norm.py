"""The ridge editors' clamp_norm: no token's value shift is longer than clamp_norm x its output's norm, and the
shifts under that limit reach the solve untouched."""

from __future__ import annotations

import pytest
import torch

from rledit.editors import ridge
from rledit.editors.training_free import TrainingFreeEditor
from rledit.errors import ConfigError


def solved_shifts(monkeypatch, editor, model, modules, batch) -> dict[int, torch.Tensor]:
    """The value shifts each module's ridge solve receives, in call order."""
    seen, solve = [], ridge.ridge_update
    monkeypatch.setattr(ridge, "ridge_update", lambda keys, shifts, *args, **kwargs:
                        seen.append(shifts.detach().clone()) or solve(keys, shifts, *args, **kwargs))
    with torch.no_grad():
        editor.predict_update(model, modules, batch)
    monkeypatch.setattr(ridge, "ridge_update", solve)
    return seen


def test_long_shifts_are_cut_to_the_limit_and_short_ones_pass(monkeypatch, ridge_edit_setup):
    model, editable, shapes, batches = ridge_edit_setup
    modules = {name: em.module for name, em in editable.items()}
    plain = solved_shifts(monkeypatch, TrainingFreeEditor(shapes), model, modules, batches[0])
    with torch.no_grad():
        output_norms = [f.output_norms for f in TrainingFreeEditor(shapes).capture(model, modules, batches[0]).values()]
    ratios = torch.cat([s.norm(dim=-1) / n for s, n in zip(plain, output_norms)])
    limit = float(ratios.median())  # half the tokens over it, half under
    clamped = solved_shifts(monkeypatch, TrainingFreeEditor(shapes, clamp_norm=limit), model, modules, batches[0])
    cut = kept = 0
    for before, after, norms in zip(plain, clamped, output_norms):
        over = before.norm(dim=-1) > limit * norms
        torch.testing.assert_close(after[~over], before[~over])
        torch.testing.assert_close(after[over].norm(dim=-1), limit * norms[over])
        torch.testing.assert_close(after[over] / after[over].norm(dim=-1, keepdim=True),
                                   before[over] / before[over].norm(dim=-1, keepdim=True))
        cut, kept = cut + int(over.sum()), kept + int((~over).sum())
    assert cut > 0 and kept > 0


def test_a_clamp_that_is_not_positive_is_refused_by_name(ridge_edit_setup):
    with pytest.raises(ConfigError, match="clamp_norm=0"):
        TrainingFreeEditor(ridge_edit_setup[2], clamp_norm=0)
