"""State an editor keeps within one edit sequence: the ridge editors' memory of earlier edits (the solve it
implies, that it keeps earlier keys, exact revert) and per-sequence normalizer statistics."""

from __future__ import annotations

import pytest
import torch

from rledit.editors.key_memory import KeyMemory
from rledit.editors.ridge import RidgeEditor
from rledit.editors.ridge_solve import ridge_update
from rledit.editors.training_free import TrainingFreeEditor
from rledit.errors import EditRefusedError
from rledit.session import EditSession


def test_ridge_with_memory_equals_the_regularised_least_squares_solution():
    g = torch.Generator().manual_seed(0)
    K, D = torch.randn(6, 10, generator=g, dtype=torch.float64), torch.randn(6, 4, generator=g, dtype=torch.float64)
    past = torch.randn(15, 10, generator=g, dtype=torch.float64)
    memory, ridge = 0.7 * past.T @ past, torch.tensor(0.3, dtype=torch.float64)
    expected = torch.linalg.solve(K.T @ K + ridge * torch.eye(10, dtype=torch.float64) + memory, K.T @ D).T
    update = ridge_update(K, D, ridge, memory=memory)
    assert update.Q.shape == (6, 10)  # still rank N: factored as (K R^-1 K^T + I)^-1 D and K R^-1
    assert (update.dense().double() - expected).norm() / expected.norm() < 1e-5  # dense() is fp32


@pytest.mark.parametrize("weight, keeps", [(1e4, True), (1e-6, False)])
def test_a_strong_memory_keeps_the_outputs_at_earlier_keys(ridge_edit_setup, weight, keeps):
    model, editable, shapes, batches = ridge_edit_setup
    editor = TrainingFreeEditor(shapes, edit_memory=weight)
    session = EditSession(model, editable, editor)
    try:
        session.edit(batches[0])
        first_keys = dict(editor.key_memory.steps[0])
        update = session.edit(batches[1])
        second_keys = editor.key_memory.steps[1]
        for name, u in update.items():
            dense = u.dense().T.float()
            at_first = (first_keys[name].float() @ dense).norm()
            at_second = (second_keys[name].float() @ dense).norm()
            assert (at_first < 0.05 * at_second) == keeps, name
    finally:
        session.revert()


def test_memory_reverts_exactly_and_ignores_refused_edits(ridge_edit_setup):
    model, editable, shapes, batches = ridge_edit_setup
    editor = TrainingFreeEditor(shapes, edit_memory=0.5)
    session = EditSession(model, editable, editor)
    try:
        session.edit(batches[0])
        session.edit(batches[1])
        after_two = {n: g.clone() for n, g in editor.key_memory.gram.items()}
        session.edit(batches[2])
        name = next(iter(shapes))
        assert not torch.allclose(editor.key_memory.gram[name], after_two[name])
        session.revert(1)
        assert len(editor.key_memory.steps) == 2
        for n, gram in editor.key_memory.gram.items():
            torch.testing.assert_close(gram, after_two[n], rtol=1e-5, atol=1e-5)
        editor.bank.calibrate_log_eta(name, float("nan"))
        with pytest.raises(EditRefusedError):
            session.edit(batches[2])
        assert len(editor.key_memory.steps) == 2
        session.revert()
        assert editor.key_memory.steps == [] and editor.key_memory.gram == {}
    finally:
        session.revert()


def test_a_step_with_more_keys_than_dimensions_is_kept_as_its_gram_and_reverts_exactly():
    g = torch.Generator().manual_seed(0)
    memory = KeyMemory(0.5)
    after_two = None
    for rows in (3, 40, 5, 60):  # narrow steps keep their keys, tall ones their Gram
        memory.propose("m", torch.randn(rows, 8, generator=g))
        memory.commit()
        after_two = memory.gram["m"].clone() if len(memory.steps) == 2 else after_two
    assert [type(step["m"]).__name__ for step in memory.steps] == ["Tensor", "StepGram", "Tensor", "StepGram"]
    assert memory.steps[1]["m"].matrix.shape == (8, 8)
    memory.revert(2)
    assert torch.equal(memory.gram["m"], after_two)
    keys = torch.randn(40, 8, generator=g)
    memory.propose("m", keys)
    memory.commit()
    torch.testing.assert_close(memory.gram["m"], after_two + 0.5 * keys.T @ keys)


def test_each_round_is_regularised_by_the_committed_keys_and_every_earlier_round_of_its_update():
    g = torch.Generator().manual_seed(1)
    memory = KeyMemory(0.5)
    committed = torch.randn(4, 8, generator=g)
    memory.propose("m", committed)
    memory.commit()
    rounds = [torch.randn(rows, 8, generator=g) for rows in (3, 5, 2)]
    for r, keys in enumerate(rounds):
        seen = torch.cat([committed, *rounds[:r]])
        torch.testing.assert_close(memory.regulariser("m"), 0.5 * seen.T @ seen)
        memory.propose("m", keys)
    memory.discard_pending()  # an update never committed leaves only the committed keys
    torch.testing.assert_close(memory.regulariser("m"), 0.5 * committed.T @ committed)


def test_memory_weight_must_be_positive():
    with pytest.raises(ValueError, match="weight"):
        KeyMemory(0.0)


@pytest.mark.parametrize("per_sequence", [True, False])
def test_normalizer_statistics_start_empty_for_each_sequence_only_when_asked(ridge_edit_setup, per_sequence):
    model, editable, shapes, batches = ridge_edit_setup
    editor = RidgeEditor(shapes, rank=8, norm_per_sequence=per_sequence)
    normalizer = next(iter(editor.bank.normalizers.values()))
    session = EditSession(model, editable, editor)
    session.edit(batches[0])
    first = int(normalizer.count)
    session.edit(batches[1])
    seen = int(normalizer.count)
    session.revert(1)
    assert int(normalizer.count) == seen  # a partial revert keeps the sequence going
    session.revert()
    assert int(normalizer.count) == (0 if per_sequence else seen)
    again = EditSession(model, editable, editor)
    again.edit(batches[0])
    again.revert(1)
    assert int(normalizer.count) == (first if per_sequence else seen + first)
