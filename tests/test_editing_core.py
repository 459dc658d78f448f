"""Factor capture, ridge solves, functional vs committed application, the ledger's exact revert."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from rledit.editing.functional import functional_update
from rledit.editing.ledger import UpdateLedger, load_updates
from rledit.editing.losses import forward_logits, target_nll
from rledit.editing.update import ModuleUpdate
from rledit.editors.mend import MendEditor
from rledit.editors.ridge_solve import ridge_update
from rledit.errors import EditRefusedError
from rledit.models.capture import capture_factors
from rledit.models.layers import resolve_edit_modules


class Batch:
    """A hand-built TokenizedBatch: targets are the last two tokens of each row."""

    def __init__(self, vocab: int, rows: int = 3, length: int = 7, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.input_ids = torch.randint(0, vocab, (rows, length), generator=g)
        self.attention_mask = torch.ones(rows, length, dtype=torch.long)
        self.labels = torch.full((rows, length), -100)
        self.labels[:, -2:] = self.input_ids[:, -2:]
        self.target_mask = torch.zeros(rows, length, dtype=torch.bool)
        self.target_mask[:, -3:-1] = True


@pytest.fixture(scope="module")
def tiny_llama():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    model = LlamaForCausalLM(config).eval()
    model.requires_grad_(False)
    editable = resolve_edit_modules(model, "model.layers.{1-2}.mlp.{gate_proj,up_proj}")
    return model, editable


def modules_of(editable):
    return {name: em.module for name, em in editable.items()}


def random_update(editable, n: int = 4, scale: float = 0.05, seed: int = 0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return {name: ModuleUpdate(scale * torch.randn(n, em.d_out, generator=g, dtype=dtype),
                               torch.randn(n, em.d_in, generator=g, dtype=dtype),
                               torch.rand(n, generator=g, dtype=dtype))
            for name, em in editable.items()}


def test_capture_of_all_tokens_gives_the_autograd_weight_gradient(tiny_llama):
    model, editable = tiny_llama
    batch = Batch(50)
    with capture_factors(modules_of(editable), None) as cap:
        target_nll(forward_logits(model, batch), batch.labels).backward()
    factors = cap.factors
    for name, em in editable.items():
        weight = em.module.weight
        weight.requires_grad_(True)
        try:
            (grad,) = torch.autograd.grad(target_nll(forward_logits(model, batch), batch.labels), weight)
        finally:
            weight.requires_grad_(False)
        f = factors[name]
        assert f.keys.shape == (batch.input_ids.numel(), em.d_in)
        torch.testing.assert_close(f.grads.T @ f.keys, grad, rtol=1e-4, atol=1e-7)


def test_capture_does_no_gradient_work_below_first_edited_layer(tiny_llama):
    model, editable = tiny_llama
    batch = Batch(50)
    seen = {}
    hooks = [model.model.layers[i].register_forward_hook(
        lambda m, a, out, i=i: seen.__setitem__(i, (out[0] if isinstance(out, tuple) else out).requires_grad))
        for i in range(3)]
    try:
        with capture_factors(modules_of(editable), batch.target_mask):
            target_nll(forward_logits(model, batch), batch.labels).backward()
    finally:
        for h in hooks:
            h.remove()
    assert seen == {0: False, 1: True, 2: True}
    assert all(p.grad is None for p in model.parameters())


def test_capture_at_target_tokens_keeps_exactly_those_rows(tiny_llama):
    model, editable = tiny_llama
    batch = Batch(50)
    modules = modules_of(editable)
    with capture_factors(modules, None) as every:
        target_nll(forward_logits(model, batch), batch.labels).backward()
    with capture_factors(modules, batch.target_mask) as targets:
        target_nll(forward_logits(model, batch), batch.labels).backward()
    rows = batch.target_mask.flatten()
    for name in modules:
        torch.testing.assert_close(targets.factors[name].keys, every.factors[name].keys[rows])
        torch.testing.assert_close(targets.factors[name].grads, every.factors[name].grads[rows])


@pytest.mark.parametrize("n, d_in", [(5, 12), (20, 12), (12, 12)])
def test_primal_and_dual_ridge_agree(n, d_in):
    g = torch.Generator().manual_seed(n)
    K = torch.randn(n, d_in, generator=g, dtype=torch.float64)
    D = torch.randn(n, 7, generator=g, dtype=torch.float64)
    ridge = torch.tensor(0.3, dtype=torch.float64)
    dual = ridge_update(K, D, ridge, form="dual").dense()
    primal = ridge_update(K, D, ridge, form="primal").dense()
    reference = torch.linalg.solve(K.T @ K + ridge * torch.eye(d_in, dtype=torch.float64), K.T @ D).T
    assert (dual.double() - primal.double()).norm() / primal.double().norm() < 1e-5
    assert (primal.double() - reference).norm() / reference.norm() < 1e-5


def test_mend_identity_without_normalization_is_a_gradient_step(tiny_llama):
    model, editable = tiny_llama
    batch = Batch(50, seed=3)
    editor = MendEditor({n: (em.d_out, em.d_in) for n, em in editable.items()}, capture_tokens="all", rank=4,
                        normalize=False)
    eta = 0.37
    for name in editable:
        editor.bank.calibrate_log_eta(name, torch.log(torch.tensor(eta)).item())
    editor.calibrated.fill_(True)
    update = editor.predict_update(model, modules_of(editable), batch)
    for name, em in editable.items():
        em.module.weight.requires_grad_(True)
        try:
            (grad,) = torch.autograd.grad(target_nll(forward_logits(model, batch), batch.labels), em.module.weight)
        finally:
            em.module.weight.requires_grad_(False)
        cosine = torch.nn.functional.cosine_similarity(update[name].dense().flatten(), -eta * grad.flatten(), dim=0)
        assert cosine > 0.9999
        torch.testing.assert_close(update[name].dense(), -eta * grad, rtol=1e-3, atol=1e-7)


def test_functional_and_committed_application_agree(tiny_llama):
    model, editable = tiny_llama
    batch = Batch(50, seed=5)
    update = random_update(editable)
    before = forward_logits(model, batch)
    with functional_update(modules_of(editable), update):
        functional = forward_logits(model, batch)
    ledger = UpdateLedger({n: em.weight_view() for n, em in editable.items()})
    ledger.commit(update)
    committed = forward_logits(model, batch)
    ledger.revert()
    assert (functional - before).abs().max() > 1e-3  # the update does something
    torch.testing.assert_close(committed, functional, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(forward_logits(model, batch), before, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_revert_is_bit_identical_after_100_commits(dtype):
    g = torch.Generator().manual_seed(1)
    weights = {"a": torch.randn(24, 16, generator=g).to(dtype), "b": torch.randn(16, 24, generator=g).to(dtype).T}
    originals = {n: w.clone() for n, w in weights.items()}
    ledger = UpdateLedger(weights)
    snapshots = []
    for i in range(100):
        ledger.commit({n: ModuleUpdate(0.01 * torch.randn(3, w.shape[0], generator=g),
                                       torch.randn(3, w.shape[1], generator=g)) for n, w in weights.items()})
        if i == 59:
            snapshots = {n: w.clone() for n, w in weights.items()}
    assert any(not torch.equal(weights[n], originals[n]) for n in weights)
    ledger.revert(40)
    assert len(ledger) == 60
    assert all(torch.equal(weights[n], snapshots[n]) for n in weights)
    ledger.revert()
    assert len(ledger) == 0
    assert all(torch.equal(weights[n], originals[n]) for n in weights)


@pytest.mark.parametrize("shape", [(12, 20), (20, 12)])
def test_an_update_with_more_rows_than_the_weight_is_stored_dense_and_reverts_exactly(shape):
    g = torch.Generator().manual_seed(4)
    weight = torch.randn(*shape, generator=g)
    original = weight.clone()
    ledger = UpdateLedger({"w": weight})
    small = ModuleUpdate(0.01 * torch.randn(5, shape[0], generator=g), torch.randn(5, shape[1], generator=g))
    tall = ModuleUpdate(0.01 * torch.randn(40, shape[0], generator=g), torch.randn(40, shape[1], generator=g),
                        scale=torch.rand(40, generator=g), alpha=0.5,
                        row_mask=torch.arange(40) % 7 != 0)
    ledger.commit({"w": small})
    after_small = weight.clone()
    ledger.commit({"w": tall})
    stored = ledger.updates[1]["w"]
    assert stored.P.shape[0] == min(shape) < 40 and ledger.updates[0]["w"].P.shape[0] == 5
    torch.testing.assert_close(weight, original + small.dense() + tall.dense(), rtol=1e-5, atol=1e-6)
    ledger.revert(1)
    assert torch.equal(weight, after_small)
    ledger.commit({"w": tall})
    ledger.revert()
    assert torch.equal(weight, original)


def test_bf16_weights_do_not_drift_through_the_fp32_master():
    weight = torch.randn(32, 32, generator=torch.Generator().manual_seed(2)).bfloat16()
    reference = weight.double()
    ledger = UpdateLedger({"w": weight})
    g = torch.Generator().manual_seed(3)
    for _ in range(200):
        u = ModuleUpdate(1e-4 * torch.randn(2, 32, generator=g), torch.randn(2, 32, generator=g))
        ledger.commit({"w": u})
        reference += u.dense().double()
    drift_master = (weight.double() - reference).abs().max()
    assert drift_master <= reference.abs().max() * 2 ** -8  # within one bf16 rounding of the exact sum


@pytest.mark.parametrize("where", ["P", "Q", "scale"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_update_is_refused_and_weights_untouched(tiny_llama, where, bad):
    model, editable = tiny_llama
    ledger = UpdateLedger({n: em.weight_view() for n, em in editable.items()})
    ledger.commit(random_update(editable, seed=1))
    before = {n: p.clone() for n, p in model.named_parameters()}
    update = random_update(editable, seed=2)
    victim = next(iter(update))
    getattr(update[victim], where)[1].fill_(bad) if where != "scale" else update[victim].scale.__setitem__(1, bad)
    with pytest.raises(EditRefusedError, match=victim):
        ledger.commit(update)
    assert len(ledger) == 1
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    ledger.revert()


def test_malformed_updates_are_refused(tiny_llama):
    _, editable = tiny_llama
    ledger = UpdateLedger({n: em.weight_view() for n, em in editable.items()})
    name = next(iter(editable))
    with pytest.raises(EditRefusedError, match="unknown modules"):
        ledger.commit({"model.layers.0.mlp.gate_proj": random_update(editable)[name]})
    with pytest.raises(EditRefusedError, match="shapes"):
        ledger.commit({name: ModuleUpdate(torch.zeros(2, 3), torch.zeros(2, 4))})
    assert len(ledger) == 0


def test_ledger_export_import_round_trip(tiny_llama, tmp_path):
    model, editable = tiny_llama
    batch = Batch(50, seed=7)
    before = forward_logits(model, batch)
    weights = lambda: {n: em.weight_view() for n, em in editable.items()}
    ledger = UpdateLedger(weights())
    for seed in range(3):
        ledger.commit(random_update(editable, seed=seed))
    edited = forward_logits(model, batch)
    ledger.save(tmp_path / "edits.safetensors")
    ledger.revert()
    assert len(load_updates(tmp_path / "edits.safetensors")) == 3
    fresh = UpdateLedger(weights())
    assert fresh.load(tmp_path / "edits.safetensors") == 3
    torch.testing.assert_close(forward_logits(model, batch), edited, rtol=0, atol=0)
    fresh.revert()
    torch.testing.assert_close(forward_logits(model, batch), before, rtol=0, atol=0)
