"""Each editor makes a real edit on the small synthetic world, and refused edits change nothing."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from rledit.data.collate import EditCollator
from rledit.editors.finetune import FineTuneEditor
from rledit.editors.mend import MendEditor
from rledit.editors.ridge import RidgeEditor
from rledit.editors.training_free import TrainingFreeEditor
from rledit.errors import DataError, EditRefusedError
from rledit.evaluation.scoring import RequestScorer
from rledit.models.layers import resolve_edit_modules
from rledit.session import EditSession

SPEC = "model.layers.{1-2}.mlp.{gate_proj,up_proj}"


@pytest.fixture(scope="module")
def edit_setup(small_world_model, small_edit_requests):
    editable = resolve_edit_modules(small_world_model.model, SPEC)
    shapes = {name: (em.d_out, em.d_in) for name, em in editable.items()}
    batch = EditCollator(small_world_model.tokenizer)(small_edit_requests[:10])
    return small_world_model.model, editable, shapes, batch


def scores(model, batch) -> dict[str, float]:
    return RequestScorer(model, 64).score(batch).summary()


# Measured on this world: before editing, efficacy is 0.2 (multi-word objects share first words, which
# the model already predicts) and specificity 1.0. One batch of 10 edits by the untrained training-free
# editor reached 0.65 and fine-tuning 1.0, so a rise of 0.25 and a floor of 0.9 leave margin for
# numerical noise while failing any editor that does not really edit.
@pytest.mark.parametrize("make_editor, min_gain", [
    (lambda shapes: TrainingFreeEditor(shapes), 0.25),
    (lambda shapes: FineTuneEditor(shapes, steps=5, lr=1.0), 0.6),
])
def test_one_batch_of_ten_edits_raises_efficacy(edit_setup, make_editor, min_gain):
    model, editable, shapes, batch = edit_setup
    before = scores(model, batch)
    session = EditSession(model, editable, make_editor(shapes))
    session.edit(batch.edit)
    after = scores(model, batch)
    session.revert()
    assert before["efficacy"] < 0.35
    assert after["efficacy"] >= before["efficacy"] + min_gain
    assert after["generalization"] > before["generalization"]
    torch.testing.assert_close(scores(model, batch)["efficacy"], before["efficacy"])


@pytest.mark.parametrize("editor_class", [MendEditor, RidgeEditor])
def test_untrained_hypernetwork_editors_already_edit(edit_setup, editor_class):
    model, editable, shapes, batch = edit_setup
    before = scores(model, batch)
    session = EditSession(model, editable, editor_class(shapes, rank=8))
    session.edit(batch.edit)
    after = scores(model, batch)
    session.revert()
    assert after["efficacy"] > before["efficacy"] + 0.1


@pytest.mark.parametrize("recalibrate", [True, False])
def test_a_recalibrating_editor_scales_each_sequence_to_its_own_first_batch(edit_setup, small_world_model,
                                                                          small_training_requests, recalibrate):
    """Untrained and recalibrated, RLEdit's editor edits a new sequence exactly as the training-free editor
    does; a learned offset survives the recalibration; without it the first calibration stays."""
    model, editable, shapes, batch = edit_setup
    modules = {n: em.module for n, em in editable.items()}
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    editor = RidgeEditor(shapes, rank=8, norm_per_sequence=True, recalibrate=recalibrate)
    reference = TrainingFreeEditor(shapes)
    other = EditCollator(small_world_model.tokenizer)(small_training_requests[:10]).edit
    EditSession(model, editable, editor).predict(other)  # a first sequence calibrates on other requests
    name = next(iter(shapes))
    with torch.no_grad():
        editor.bank.log_eta(name).sub_(0.5)  # what training would have learned
    EditSession(model, editable, editor)  # a new sequence
    EditSession(model, editable, reference)
    update = editor.predict_update(model, modules, batch.edit)
    expected = reference.predict_update(model, modules, batch.edit)
    learned = float((editor.bank.log_eta(name) - reference.bank.log_eta(name)).detach())
    if recalibrate:
        assert learned == pytest.approx(-0.5, abs=1e-5)
        for other_name in set(shapes) - {name}:
            torch.testing.assert_close(editor.bank.log_eta(other_name), reference.bank.log_eta(other_name))
            torch.testing.assert_close(editor.bank.log_lambda(other_name), reference.bank.log_lambda(other_name))
            torch.testing.assert_close(update[other_name].dense(), expected[other_name].dense())
    else:
        assert abs(learned + 0.5) > 1e-3  # calibrated on the other requests, not these
    assert all(torch.equal(p, original[n]) for n, p in model.named_parameters())  # the shared model is untouched


def test_finetune_norm_constraint_bounds_each_module_update(edit_setup):
    model, editable, shapes, batch = edit_setup
    update = FineTuneEditor(shapes, steps=3, lr=1.0, max_norm=0.05).predict_update(
        model, {n: em.module for n, em in editable.items()}, batch.edit)
    norms = [float(u.frobenius_sq().sqrt()) for u in update.values()]
    assert max(norms) <= 0.05 * (1 + 1e-4) and min(norms) > 0


def test_nan_in_the_editor_output_is_refused_and_the_model_is_untouched(edit_setup):
    model, editable, shapes, batch = edit_setup
    editor = TrainingFreeEditor(shapes)
    session = EditSession(model, editable, editor)
    session.edit(batch.edit)
    before = {n: p.clone() for n, p in model.named_parameters()}
    name = next(iter(shapes))
    editor.bank.calibrate_log_eta(name, float("nan"))  # the next prediction's step size poisons the update
    with pytest.raises(EditRefusedError, match="non-finite"):
        session.edit(batch.edit)
    assert len(session.ledger) == 1
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    session.revert()


def test_subject_capture_reads_each_prompts_subject_token_and_needs_a_subject(edit_setup, small_edit_requests,
                                                                              small_world_model):
    model, editable, shapes, batch = edit_setup
    editor = TrainingFreeEditor(shapes, capture_tokens="subject")
    assert editor.needs_subject
    modules = {name: em.module for name, em in editable.items()}
    factors = editor.capture(model, modules, batch.edit)
    seen = {}
    name = next(iter(modules))
    handle = modules[name].register_forward_hook(lambda _m, args, _out: seen.update(inputs=args[0]))
    with torch.no_grad():
        model(input_ids=batch.edit.input_ids, attention_mask=batch.edit.attention_mask)
    handle.remove()
    rows = torch.arange(batch.edit.num_rows)
    torch.testing.assert_close(factors[name].keys, seen["inputs"][rows, batch.edit.subject_last])
    no_subject = dataclasses.replace(small_edit_requests[0], subject="Nobody")
    with pytest.raises(DataError, match=r"subject's last token, but the prompts of edit row\(s\) 0"):
        editor.capture(model, modules, EditCollator(small_world_model.tokenizer)([no_subject]).edit)
