"""Numerical faults injected into lifelong runs and into training: a faulty step is refused without a trace.

Evaluation: NaN/inf injected into the captured factors, the hypernetwork's outputs or the ridge solve at one
step of `run_lifelong`. The step is refused and counted, the weights and the editor's state after it are
bit-identical to before it, and the run ends exactly where a run that never saw the faulty batch ends.
Training: a sequence with a non-finite loss, or with a non-finite update, is skipped with the optimizer
state and the editor (parameters and normalizer statistics) bit-identical to before it.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import lightning as L
import pytest
import torch

from rledit.data.collate import EditCollator
from rledit.data.streams import EditStream
from rledit.editors import ridge_solve
from rledit.editors.factor_editor import FactorEditor
from rledit.editors.hypernet import HyperNetworkBank
from rledit.editors.training_free import TrainingFreeEditor
from rledit.errors import EditRefusedError
from rledit.evaluation.report import results_document
from rledit.evaluation.runner import Protocol, run_lifelong
from rledit.models.layers import resolve_edit_modules
from rledit.session import EditSession
from rledit.threads import cpu_threads
from rledit.training import rollout
from tests.test_ddp import build

EDIT_MODULES = "model.layers.{1-2}.mlp.{gate_proj,up_proj}"  # as configs/model/tiny.yaml
PROTOCOL = Protocol(num_steps=4, edits_per_step=2, seed=3)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with cpu_threads(1):
        yield


class RecordingSession(EditSession):
    """An edit session that numbers its edit steps and keeps the edited weights and the editor's state as
    each step begins (so also as the previous one, refused or not, was left by the runner)."""

    def __init__(self, model):
        editable = resolve_edit_modules(model, EDIT_MODULES)
        editor = TrainingFreeEditor({name: (em.d_out, em.d_in) for name, em in editable.items()})
        super().__init__(model, editable, editor)
        self.step = 0
        self.before_step: list[dict[str, torch.Tensor]] = []

    def state(self) -> dict[str, torch.Tensor]:
        weights = {f"weight/{name}": em.weight_view().clone() for name, em in self.editable.items()}
        return weights | {f"editor/{k}": v.clone() for k, v in self.editor.state_dict().items()}

    def edit(self, batch):
        self.step += 1
        self.before_step.append(self.state())
        return super().edit(batch)


def bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def poison_captured_keys(monkeypatch, session: RecordingSession, at: int) -> None:
    capture = FactorEditor.capture

    def faulty(self, *args):
        factors = capture(self, *args)
        if session.step == at:
            next(iter(factors.values())).keys[0, 0] = float("nan")
        return factors

    monkeypatch.setattr(FactorEditor, "capture", faulty)


def poison_hypernetwork_output(monkeypatch, session: RecordingSession, at: int) -> None:
    forward = HyperNetworkBank.forward

    def faulty(self, *args, **kwargs):
        keys_t, grads_t = forward(self, *args, **kwargs)
        return (keys_t, grads_t * float("inf")) if session.step == at else (keys_t, grads_t)

    monkeypatch.setattr(HyperNetworkBank, "forward", faulty)


def poison_solution(monkeypatch, session: RecordingSession, at: int) -> None:
    solve = ridge_solve.spd_solve

    def faulty(A, B):
        solution = solve(A, B)
        return solution * float("nan") if session.step == at else solution

    monkeypatch.setattr(ridge_solve, "spd_solve", faulty)


def fail_solve(monkeypatch, session: RecordingSession, at: int) -> None:
    solve = ridge_solve.spd_solve

    def faulty(A, B):
        if session.step == at:
            raise torch.linalg.LinAlgError("ridge system is not positive definite even with jitter")
        return solve(A, B)

    monkeypatch.setattr(ridge_solve, "spd_solve", faulty)


FAULTS: dict[str, Callable] = {"captured factors": poison_captured_keys,
                               "hypernetwork output": poison_hypernetwork_output,
                               "ridge solution": poison_solution, "ridge solve fails": fail_solve}


@pytest.fixture(scope="module")
def clean_runs(small_world_model, small_edit_requests):
    """For each faulty step: the weights and editor state after editing every batch of the stream but that."""
    model, collator = small_world_model.model, EditCollator(small_world_model.tokenizer)
    batches = [collator(step) for step in EditStream(small_edit_requests, PROTOCOL.num_steps,
                                                     PROTOCOL.edits_per_step, PROTOCOL.seed).steps]
    ends = {}
    for faulty in range(1, PROTOCOL.num_steps + 1):
        session = RecordingSession(model)
        for step, batch in enumerate(batches, start=1):
            if step != faulty:
                session.edit(batch.edit)
        ends[faulty] = session.state()
        session.revert()
    return ends


@pytest.mark.parametrize("at", [1, 3])
@pytest.mark.parametrize("fault", FAULTS)
def test_a_faulty_edit_step_is_refused_counted_and_leaves_no_trace(small_world_model, small_edit_requests,
                                                                    clean_runs, monkeypatch, fault, at):
    model = small_world_model.model
    unedited = {k: v.clone() for k, v in model.state_dict().items()}
    session = RecordingSession(model)
    FAULTS[fault](monkeypatch, session, at)
    try:
        collator = EditCollator(small_world_model.tokenizer)
        result = run_lifelong(session, collator, small_edit_requests, PROTOCOL)
        end = session.state()
    finally:
        session.revert()
    assert [s.refused for s in result.per_step] == [step == at for step in range(1, PROTOCOL.num_steps + 1)]
    assert result.refused_edits == 1
    assert results_document(result, skipped_records=0, editor={}, config={})["refused_edits"] == 1
    assert bitwise_equal(session.before_step[at - 1], session.before_step[at])  # weights, editor: to the bit
    assert bitwise_equal(end, clean_runs[at])  # the run went on as if the faulty batch had never come
    assert bitwise_equal(model.state_dict(), unedited)


class SequenceSnapshots(L.Callback):
    """The optimizer state, editor state and skipped-step count after every training sequence; arms the
    fault injected into the sequence numbered `faulty` (0-based)."""

    def __init__(self, faulty: int):
        self.faulty, self.armed, self.after = faulty, False, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.armed = len(self.after) == self.faulty

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.armed = False
        self.after.append((copy.deepcopy(trainer.optimizers[0].state_dict()),
                           {k: v.clone() for k, v in pl_module.editor.state_dict().items()},
                           pl_module.skipped_steps))


def non_finite_loss(monkeypatch, snapshots: SequenceSnapshots) -> None:
    loss = rollout.weighted_target_nll

    def faulty(*args, **kwargs):
        value = loss(*args, **kwargs)
        return value * float("nan") if snapshots.armed else value

    monkeypatch.setattr(rollout, "weighted_target_nll", faulty)


def non_finite_update(monkeypatch, snapshots: SequenceSnapshots) -> None:
    forward = HyperNetworkBank.forward

    def faulty(self, name, K, G, *args, **kwargs):
        return forward(self, name, K, G * float("nan") if snapshots.armed else G, *args, **kwargs)

    monkeypatch.setattr(HyperNetworkBank, "forward", faulty)


@pytest.mark.parametrize("fault", [non_finite_loss, non_finite_update], ids=["loss", "update"])
def test_a_non_finite_training_sequence_is_skipped_leaving_optimizer_and_editor_untouched(monkeypatch, fault):
    module, datamodule = build(normalize=True)
    snapshots = SequenceSnapshots(faulty=2)
    fault(monkeypatch, snapshots)
    L.Trainer(max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, deterministic=True,
              accelerator="cpu", devices=1, callbacks=[snapshots]).fit(module, datamodule=datamodule)

    assert [skipped for _, _, skipped in snapshots.after] == [0, 0, 1, 1]
    (optimizer_before, editor_before, _), (optimizer_after, editor_after, _) = snapshots.after[1:3]
    assert bitwise_equal(editor_before, editor_after)  # parameters and normalizer statistics
    assert optimizer_before["param_groups"] == optimizer_after["param_groups"]
    assert optimizer_before["state"].keys() == optimizer_after["state"].keys()
    for index, state in optimizer_before["state"].items():
        assert bitwise_equal(state, optimizer_after["state"][index])
    # training went on: the next sequence stepped the optimizer from finite values
    last_editor = snapshots.after[3][1]
    assert not bitwise_equal(editor_after, last_editor)
    assert all(bool(torch.isfinite(v).all()) for v in last_editor.values() if v.is_floating_point())


def _fit_one_epoch(module, datamodule) -> None:
    L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, deterministic=True,
              accelerator="cpu", devices=1).fit(module, datamodule=datamodule)


@pytest.mark.parametrize("refusals", [1, 3])
def test_training_calibrates_on_the_first_usable_batch_and_names_the_refusals_when_none_is(monkeypatch, refusals):
    module, datamodule = build(normalize=True)
    calibrate, calls = type(module.editor)._calibrate, []

    def refusing(self, name, *args):
        calls.append(name)
        if len(calls) <= refusals:  # the first `refusals` batches (one module each) refuse
            raise EditRefusedError(f"module '{name}': step size calibration refused (injected {len(calls)})")
        return calibrate(self, name, *args)

    monkeypatch.setattr(type(module.editor), "_calibrate", refusing)
    if refusals < len(datamodule.train_sequences[0]):
        _fit_one_epoch(module, datamodule)
        assert bool(module.editor.calibrated) and module.skipped_steps == 0
    else:  # every batch of the first sequence refused: training does not start, and says why
        with pytest.raises(EditRefusedError, match="no batch of the first training sequence.*injected 3"):
            _fit_one_epoch(module, datamodule)
        assert not bool(module.editor.calibrated)
