"""The RLEdit rollout: two-stage backward equals the direct gradient, weights restored, norm penalty works."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from rledit.data.collate import EditCollator
from rledit.data.records import EditRecord, LocalityPair
from rledit.editing.functional import functional_update
from rledit.editing.ledger import UpdateLedger
from rledit.editing.losses import forward_logits, shifted, target_nll
from rledit.editors.ridge import RidgeEditor
from rledit.errors import ConfigError
from rledit.models.layers import resolve_edit_modules
from rledit.training.rollout import Objective, _locality_look_back, _look_back, rollout
from tests.test_collate import build_word_tokenizer

WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa", "lambda", "mu"]


def locality_kl(base_logits: torch.Tensor, edited_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The reference: KL(p_base || p_edited) averaged over the answer positions of locality prompts."""
    base, _, mask = shifted(base_logits, labels)
    edited, _, _ = shifted(edited_logits, labels)
    base_logp = base[mask].float().log_softmax(-1)
    edited_logp = edited[mask].float().log_softmax(-1)
    return F.kl_div(edited_logp, base_logp, log_target=True, reduction="batchmean")


def make_records(n: int) -> list[EditRecord]:
    g = torch.Generator().manual_seed(0)

    def words(k: int) -> str:
        return " ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (k,), generator=g))

    return [EditRecord(f"r{i}", words(4), words(1), rephrase_prompts=(words(5),),
                       locality=(LocalityPair(words(4), words(1)),)) for i in range(n)]


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    records = make_records(12)
    tokenizer = build_word_tokenizer(WORDS)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    model = LlamaForCausalLM(config).eval()
    model.requires_grad_(False)
    editable = resolve_edit_modules(model, "model.layers.{1-2}.mlp.{gate_proj,up_proj}")
    collator = EditCollator(tokenizer)
    steps = [collator(records[i:i + 3]) for i in range(0, 12, 3)]
    editor = RidgeEditor({n: (em.d_out, em.d_in) for n, em in editable.items()}, rank=8)
    modules = {n: em.module for n, em in editable.items()}
    with torch.no_grad():
        editor.predict_update(model, modules, steps[0].edit)  # calibrate step sizes
    with torch.no_grad():  # move the network off its identity init so every path carries gradient
        for p in editor.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return model, editable, modules, steps, editor


def weights_of(editable):
    return {n: em.weight_view() for n, em in editable.items()}


def direct_gradient(editor, model, modules, editable, steps, objective):
    """Reference: every loss of a step summed in one graph through the editor, backward once."""
    ledger = UpdateLedger(weights_of(editable))
    with torch.no_grad():
        unedited = [forward_logits(model, s.locality) for s in steps]
    for t, batch in enumerate(steps):
        update = editor.predict_update(model, modules, batch.edit)
        weight = objective.discount ** t / len(steps)
        total = 0.0
        for i, look_back_weight in _look_back(t, objective):
            past, w = steps[i], weight * look_back_weight
            with functional_update(modules, update):
                for which in objective.gen_prompts:
                    b = getattr(past, which)
                    total = total + w * target_nll(forward_logits(model, b), b.labels)
        for i, look_back_weight in _locality_look_back(t, objective):
            past, w = steps[i], weight * look_back_weight
            with torch.no_grad():
                base = forward_logits(model, past.locality)
            if objective.locality_reference == "original":
                base = unedited[i]
            with functional_update(modules, update):
                total = total + w * objective.locality_weight * locality_kl(
                    base, forward_logits(model, past.locality), past.locality.labels)
        total = total + weight * objective.norm_penalty * sum(u.frobenius_sq() for u in update.values())
        total.backward()
        ledger.commit({n: u.detach() for n, u in update.items()})
    ledger.revert()
    return {n: p.grad.clone() for n, p in editor.named_parameters() if p.grad is not None}


@pytest.mark.parametrize(("chunk_rows", "reference", "look_back", "locality_batches"),
                         [(None, "previous", "recent", "look_back"), (256, "previous", "recent", "look_back"),
                          (5, "previous", "recent", "look_back"), (None, "original", "recent", "look_back"),
                          (5, "original", "recent", "look_back"), (5, "original", "spread", "look_back"),
                          (5, "original", "spread", "current"), (None, "previous", "recent", "current")])
def test_two_stage_backward_equals_direct_gradient_and_restores_weights(setup, chunk_rows, reference, look_back,
                                                                         locality_batches):
    model, editable, modules, steps, editor = setup
    objective = Objective(back_depth=2, decay=0.9, discount=0.95, locality_weight=0.5, norm_penalty=1e-2,
                          chunk_rows=chunk_rows, locality_reference=reference, look_back=look_back,
                          locality_batches=locality_batches)
    before = {n: p.clone() for n, p in model.named_parameters()}
    staged_editor, direct_editor = copy.deepcopy(editor), copy.deepcopy(editor)
    stats = rollout(staged_editor, model, modules, UpdateLedger(weights_of(editable)), steps, objective)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    reference = direct_gradient(direct_editor, model, modules, editable, steps, objective)
    staged = {n: p.grad for n, p in staged_editor.named_parameters() if p.grad is not None}
    assert set(staged) == set(reference) and len(staged) > 0
    for name in reference:
        torch.testing.assert_close(staged[name], reference[name], rtol=1e-4, atol=1e-8)
    assert stats.finite and stats.gen_loss > 0 and stats.ret < 0


def test_a_two_round_editor_trains_through_both_rounds(setup):
    """The second round's factors are captured on the model with the first round applied (data, like the
    first round's); the gradient reaches the editor through both rounds' outputs."""
    model, editable, modules, steps, editor = setup
    objective = Objective(back_depth=2, locality_weight=0.5, norm_penalty=1e-2, chunk_rows=5)
    one_round, staged_editor, direct_editor = (copy.deepcopy(editor) for _ in range(3))
    staged_editor.rounds = direct_editor.rounds = 2
    rollout(one_round, model, modules, UpdateLedger(weights_of(editable)), steps, objective)
    rollout(staged_editor, model, modules, UpdateLedger(weights_of(editable)), steps, objective)
    reference = direct_gradient(direct_editor, model, modules, editable, steps, objective)
    staged = {n: p.grad for n, p in staged_editor.named_parameters() if p.grad is not None}
    assert set(staged) == set(reference) and len(staged) > 0
    for name in reference:
        torch.testing.assert_close(staged[name], reference[name], rtol=1e-4, atol=1e-8)
    single = dict(one_round.named_parameters())
    assert any(not torch.allclose(staged[n], single[n].grad) for n in staged)


def test_recent_look_back_scores_the_last_k_batches_with_decayed_weights():
    objective = Objective(back_depth=3, decay=0.5)
    assert _look_back(0, objective) == [(0, 1.0)]
    assert _look_back(5, objective) == [(5, 1.0), (4, 0.5), (3, 0.25)]


@pytest.mark.parametrize(("back_depth", "decay"), [(2, 1.0), (4, 0.9), (10, 0.95)])
def test_spread_look_back_stands_for_the_whole_sequence_at_k_batches_a_step(back_depth, decay):
    spread = Objective(back_depth=back_depth, decay=decay, look_back="spread")
    recent = Objective(back_depth=back_depth, decay=decay)
    length = 50
    scored = set()
    for t in range(length):
        picks = _look_back(t, spread)
        if t < back_depth:
            assert picks == _look_back(t, recent)
        steps = [i for i, _ in picks]
        assert len(picks) == min(back_depth, t + 1) and len(set(steps)) == len(steps) and steps[0] == t
        assert all(0 <= i <= t for i in steps)
        # the weights add up to the decayed weight of every batch so far, not just the last k
        assert sum(w for _, w in picks) == pytest.approx(sum(decay ** j for j in range(t + 1)))
        scored.update(steps)
    assert scored == set(range(length))  # the pick inside each stretch moves, so no batch goes unscored


def test_current_locality_batch_carries_the_whole_look_back_weight():
    objective = Objective(back_depth=3, decay=0.5, locality_batches="current")
    assert _locality_look_back(5, objective) == [(5, 1.75)]
    assert _locality_look_back(5, Objective(back_depth=3, decay=0.5)) == _look_back(5, objective)


def test_unknown_look_back_is_a_config_error():
    with pytest.raises(ConfigError, match="look_back='oldest'"):
        Objective(look_back="oldest")


def test_norm_penalty_shrinks_the_trained_updates(setup):
    model, editable, modules, steps, editor = setup

    def trained_update_norm(penalty: float) -> float:
        trained = copy.deepcopy(editor)
        optimizer = torch.optim.Adam(trained.parameters(), lr=3e-2)
        objective = Objective(back_depth=2, norm_penalty=penalty)
        for _ in range(8):
            rollout(trained, model, modules, UpdateLedger(weights_of(editable)), steps, objective)
            optimizer.step()
            optimizer.zero_grad()
        with torch.no_grad():
            update = trained.predict_update(model, modules, steps[1].edit)
        return float(sum(u.frobenius_sq() for u in update.values()))

    unpenalised = trained_update_norm(0.0)
    penalised = trained_update_norm(1e3 / unpenalised)
    assert penalised < 0.5 * unpenalised
