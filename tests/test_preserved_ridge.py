"""Preserved knowledge in the ridge editors (training-free, MALMEN, RLEdit): MEMIT's prior and AlphaEdit's
null-space projection as options of the ridge solve, against dense closed forms, and in a real edit."""

from __future__ import annotations

import pytest
import torch

from rledit.data.collate import EditCollator
from rledit.data.text import SampledText
from rledit.editing.losses import forward_logits, target_nll
from rledit.editors.base import EditContext
from rledit.editors.nullspace import movable_share, nullspace_projector
from rledit.editors.ridge_solve import ridge_update
from rledit.editors.training_free import TrainingFreeEditor
from rledit.errors import ConfigError
from rledit.models.layers import resolve_edit_modules
from rledit.models.statistics import PreservedStatistics
from rledit.session import EditSession
from rledit.threads import cpu_threads

N, D_IN, D_OUT = 6, 16, 9


def preserved_knowledge(seed: int = 0) -> torch.Tensor:
    """A second moment whose top 10 directions carry almost all the energy, as real activations do."""
    g = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(D_IN, D_IN, generator=g, dtype=torch.float64))
    values = torch.cat([torch.linspace(5.0, 1.0, 10, dtype=torch.float64), torch.full((D_IN - 10,), 1e-6,
                                                                                     dtype=torch.float64)])
    return basis @ torch.diag(values) @ basis.T


def dense(update) -> torch.Tensor:
    """The update's dense matrix in its own (fp64) precision."""
    return update.P.T @ update.Q


def problem(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    K = torch.randn(N, D_IN, generator=g, dtype=torch.float64)
    D = torch.randn(N, D_OUT, generator=g, dtype=torch.float64)
    earlier = torch.randn(4, D_IN, generator=g, dtype=torch.float64)
    return K, D, torch.tensor(0.3, dtype=torch.float64), earlier.T @ earlier


@pytest.mark.parametrize("use_memory, weight, project", [(False, 5.0, False), (False, 0.0, True),
                                                         (True, 5.0, True), (True, 0.0, False)])
def test_the_factored_solve_is_the_dense_closed_form(use_memory, weight, project):
    K, D, ridge, memory = problem()
    C = preserved_knowledge()
    projector, _ = nullspace_projector("m", C, 1e-3)
    prior = weight * C if weight else None
    update = ridge_update(K, D, ridge, memory=memory if use_memory else None, prior=prior,
                          projector=projector if project else None)
    assert update.Q.shape == (N, D_IN)  # rank N: no dense d_out x d_in update before commit
    # dense reference: S = argmin ||Kp S - D||^2 + S^T R S, dW^T = Pn S
    Pn = projector if project else torch.eye(D_IN, dtype=torch.float64)
    zero = torch.zeros(D_IN, D_IN, dtype=torch.float64)
    terms = (memory if use_memory else zero) + (prior if weight else zero)
    R = ridge * torch.eye(D_IN, dtype=torch.float64) + Pn @ terms @ Pn
    Kp = K @ Pn
    S = torch.linalg.solve(Kp.T @ Kp + R, Kp.T @ D)
    torch.testing.assert_close(dense(update), (Pn @ S).T, rtol=1e-8, atol=1e-10)


def test_a_projected_update_does_not_move_the_outputs_of_preserved_keys():
    K, D, ridge, memory = problem()
    C = preserved_knowledge()
    projector, rank = nullspace_projector("m", C, 1e-3)
    assert rank == D_IN - 10
    preserved = torch.linalg.eigh(C).eigenvectors[:, -10:]  # the directions preserved text uses
    plain = dense(ridge_update(K, D, ridge, memory=memory))
    projected = dense(ridge_update(K, D, ridge, memory=memory, projector=projector))
    assert (plain @ preserved).norm() > 0.1 * plain.norm()
    assert (projected @ preserved).norm() < 1e-10 * plain.norm()


def test_a_heavier_prior_moves_generic_outputs_less_and_the_edited_ones_less_too():
    K, D, ridge, _ = problem()
    C = preserved_knowledge()
    generic, edited = [], []
    for weight in (0.0, 1.0, 100.0):
        dW = dense(ridge_update(K, D, ridge, prior=weight * C if weight else None))
        generic.append(float(torch.trace(dW @ C @ dW.T)))  # E ||dW k||^2 over preserved keys
        edited.append(float((K @ dW.T - D).norm()))
    assert generic[0] > generic[1] > generic[2]
    assert edited[0] < edited[1] < edited[2]  # the trade: edits fit less well under a heavier prior


def test_the_energy_threshold_keeps_the_directions_that_hold_that_share_of_the_trace():
    values = torch.tensor([1e4, 10.0, 5.0, 3.0, 1.0, 0.5, 0.2, 0.1], dtype=torch.float64)  # one outlier dimension
    C = torch.diag(values)
    _, relative = nullspace_projector("m", C, 1e-2, "relative")  # everything below 100: 7 of 8 directions
    projector, energy = nullspace_projector("m", C, 0.85 / values.sum(), "energy")  # 0.1 + 0.2 + 0.5 <= 0.85
    assert (relative, energy) == (7, 3)
    torch.testing.assert_close(projector, torch.diag(torch.tensor([0, 0, 0, 0, 0, 1, 1, 1], dtype=torch.float64)))


def test_the_movable_share_is_the_energy_the_projector_keeps_on_its_own_keys_and_more_on_others():
    g = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(8, 8, generator=g, dtype=torch.float64))[0]
    values = torch.tensor([1e4, 10.0, 5.0, 3.0, 1.0, 0.5, 0.2, 0.1], dtype=torch.float64)
    C = basis @ torch.diag(values) @ basis.T
    projector, _ = nullspace_projector("m", C, 0.85 / values.sum(), "energy")
    assert movable_share(projector, C) == pytest.approx(0.8 / values.sum())  # 0.5 + 0.2 + 0.1 of the trace
    assert movable_share(projector, torch.eye(8, dtype=torch.float64)) == pytest.approx(3 / 8)  # isotropic keys
    assert movable_share(torch.zeros(8, 8, dtype=torch.float64), C) == 0.0


def test_an_empty_null_space_is_an_error_naming_the_module():
    with pytest.raises(ConfigError, match="null space of module 'layer.7' is empty"):
        nullspace_projector("layer.7", torch.eye(4, dtype=torch.float64), 1e-2)


@pytest.fixture(scope="module")
def statistics(tmp_path_factory):
    return PreservedStatistics(SampledText(num_texts=64, length=24), num_tokens=1500,
                               cache_dir=str(tmp_path_factory.mktemp("statistics")), progress=False)


def set_up(world_model, statistics, **options):
    editable = resolve_edit_modules(world_model.model, "model.layers.{1-2}.mlp.{gate_proj,up_proj}")
    editor = TrainingFreeEditor({name: (em.d_out, em.d_in) for name, em in editable.items()}, **options)
    modules = {name: em.module for name, em in editable.items()}
    editor.setup(EditContext(world_model.model, world_model.tokenizer, modules, statistics))
    return editor, editable


def test_the_training_free_editor_edits_within_the_null_space_and_reverts_exactly(
        small_world_model, small_edit_requests, statistics):
    with cpu_threads(1):
        editor, editable = set_up(small_world_model, statistics, nullspace_threshold=1e-2, edit_memory=1.0)
        assert set(editor.report()["projector_rank"]) == set(editable)
        model = small_world_model.model
        batch = EditCollator(small_world_model.tokenizer)(small_edit_requests[:10]).edit
        original = {n: p.detach().clone() for n, p in model.named_parameters()}
        before = float(target_nll(forward_logits(model, batch), batch.labels))
        session = EditSession(model, editable, editor)
        update = session.edit(batch)
        after = float(target_nll(forward_logits(model, batch), batch.labels))
        assert after < before - 0.1  # the projected edit still edits
        for name, module_update in update.items():
            outside = module_update.Q @ (torch.eye(module_update.Q.shape[1]) - editor.projectors[name])
            assert outside.norm() < 1e-4 * module_update.Q.norm()
        session.revert()
        assert all(torch.equal(p, original[n]) for n, p in model.named_parameters())


def test_the_prior_needs_statistics(small_world_model):
    editable = resolve_edit_modules(small_world_model.model, "model.layers.1.mlp.gate_proj")
    editor = TrainingFreeEditor({name: (em.d_out, em.d_in) for name, em in editable.items()}, preserve_weight=1e3)
    with pytest.raises(ConfigError, match="need preserved-knowledge statistics"):
        editor.setup(EditContext(small_world_model.model, small_world_model.tokenizer,
                                 {name: em.module for name, em in editable.items()}, None))
    with pytest.raises(ConfigError, match="preserve_weight=-1.0 must be >= 0"):
        TrainingFreeEditor({"m": (2, 3)}, preserve_weight=-1.0)


def test_the_ridge_is_calibrated_on_the_keys_the_solve_sees(small_world_model, small_edit_requests, statistics):
    with cpu_threads(1):
        projected, editable = set_up(small_world_model, statistics, nullspace_threshold=1e-2, threshold_kind="energy")
        plain, _ = set_up(small_world_model, statistics)
        batch = EditCollator(small_world_model.tokenizer)(small_edit_requests[:10]).edit
        modules = {name: em.module for name, em in editable.items()}
        factors = plain.capture(small_world_model.model, modules, batch)
        plain.update_from_factors(factors)
        projected.update_from_factors(factors)
    for name, f in factors.items():
        ratio = float(projected.bank.log_lambda(name).exp() / plain.bank.log_lambda(name).exp())
        expected = float((f.keys @ projected.projectors[name]).pow(2).sum(-1).mean() / f.keys.pow(2).sum(-1).mean())
        assert ratio == pytest.approx(expected, rel=1e-4)
        assert ratio < 0.5  # the null space of preserved text holds little of an edit key's norm
