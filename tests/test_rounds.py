"""Rounds of one edit: each round captures on the model with the earlier rounds applied, and the rounds commit
as one update (the same as predicting again after committing the first, with one ledger entry)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from rledit.editing.functional import functional_update
from rledit.editing.losses import forward_logits, target_nll
from rledit.editing.update import concat_updates
from rledit.editors.training_free import TrainingFreeEditor
from rledit.errors import ConfigError
from rledit.session import EditSession


@pytest.mark.parametrize("round_decay", [1.0, 0.5])
def test_two_rounds_are_a_second_prediction_on_the_model_with_the_first_applied(ridge_edit_setup, round_decay):
    """With `round_decay` the second round's update is that prediction scaled by the decay."""
    model, editable, shapes, batches = ridge_edit_setup
    modules = {name: em.module for name, em in editable.items()}
    with torch.no_grad():
        two_rounds = TrainingFreeEditor(shapes, edit_memory=1.0, rounds=2, round_decay=round_decay).predict_update(
            model, modules, batches[0])
        stepwise = TrainingFreeEditor(shapes, edit_memory=1.0)
        first = stepwise.predict_update(model, modules, batches[0])
        stepwise.committed()  # the second round's solve keeps the first round's keys, as a committed edit's
        with functional_update(modules, first):
            second = stepwise.predict_update(model, modules, batches[0])
    expected = concat_updates(first, {name: replace(u, alpha=u.alpha * round_decay) for name, u in second.items()})
    for name, update in two_rounds.items():
        assert update.P.shape[0] == 2 * first[name].P.shape[0]
        torch.testing.assert_close(update.dense(), expected[name].dense(), rtol=1e-4, atol=1e-6)


def target_loss(model, batch) -> float:
    with torch.no_grad():
        return float(target_nll(forward_logits(model, batch), batch.labels))


def test_a_second_round_edits_harder_and_reverts_exactly(ridge_edit_setup):
    model, editable, shapes, batches = ridge_edit_setup
    original = {name: em.weight_view().clone() for name, em in editable.items()}
    losses = {}
    for rounds in (1, 2):
        session = EditSession(model, editable, TrainingFreeEditor(shapes, rounds=rounds))
        try:
            session.edit(batches[0])
            assert len(session.ledger) == 1
            losses[rounds] = target_loss(model, batches[0])
        finally:
            session.revert()
        assert all(torch.equal(em.weight_view(), original[name]) for name, em in editable.items())
    assert losses[2] < losses[1] < target_loss(model, batches[0])


def test_a_prediction_never_committed_leaves_no_keys_behind(ridge_edit_setup):
    model, editable, shapes, batches = ridge_edit_setup
    editor = TrainingFreeEditor(shapes, edit_memory=1.0, rounds=2)
    session = EditSession(model, editable, editor)
    try:
        session.predict(batches[1])
        session.edit(batches[0])
        name = next(iter(shapes))
        committed = editor.key_memory.steps[0][name]
        assert len(editor.key_memory.steps) == 1 and committed.shape[0] == 2 * batches[0].target_mask.sum()
    finally:
        session.revert()


def test_rounds_must_be_positive(ridge_edit_setup):
    with pytest.raises(ConfigError, match="rounds=0"):
        TrainingFreeEditor(ridge_edit_setup[2], rounds=0)


@pytest.mark.parametrize("round_decay", [0.0, -0.5, 1.5])
def test_round_decay_must_be_in_the_unit_interval(ridge_edit_setup, round_decay):
    with pytest.raises(ConfigError, match=f"round_decay={round_decay}"):
        TrainingFreeEditor(ridge_edit_setup[2], rounds=2, round_decay=round_decay)
