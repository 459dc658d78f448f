"""Metrics on hand-built logits with known answers, and scoring on a tiny model against per-row references."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from transformers import LlamaForCausalLM

from rledit.data.collate import EditCollator, TokenizedBatch
from rledit.data.records import EditRecord, LocalityPair
from rledit.data.synthetic.pretrain import model_config
from rledit.data.synthetic.tokenizer import build_tokenizer
from rledit.data.synthetic.world import build_world
from rledit.editing.losses import forward_logits, shifted
from rledit.evaluation.metrics import (
    RowScores,
    agreement,
    mean_over_requests,
    per_request_mean,
    perplexity,
    prefers,
    rows_from_tokens,
)
from rledit.evaluation.scoring import (
    RequestScorer,
    greedy_exact_match,
    score_rows,
    scoring_plan,
    swapped_targets,
    text_rows,
)
from rledit.threads import cpu_threads

BIG = 100.0  # logits at positions that must be ignored (prompt, padding)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These tiny models run several times faster on one thread than on a shared multi-core CPU."""
    with cpu_threads(1):
        yield


def hand_built():
    """Row 0: prompt [0, 1], 3-token target [2, 3, 1]; row 1: prompt [0, 1], 1-token target [2], 2 pads.

    Logits at position i predict token i + 1; every position that predicts no target token holds BIG
    at a wrong token, so any leak of prompt or padding positions changes the results.
    """
    labels = torch.tensor([[-100, -100, 2, 3, 1], [-100, -100, 2, -100, -100]])
    logits = torch.zeros(2, 5, 4)
    logits[:, :, 0] = BIG
    logits[0, 1] = torch.tensor([0.0, 0.0, 2.0, 0.0])  # predicts 2: right
    logits[0, 2] = torch.tensor([0.0, 3.0, 0.0, 1.0])  # predicts 1, target 3: wrong
    logits[0, 3] = torch.tensor([0.0, 1.0, 0.0, 0.0])  # predicts 1: right
    logits[1, 1] = torch.tensor([1.0, 0.0, 0.0, 0.0])  # predicts 0, target 2: wrong
    return logits, labels


def log_softmax_at(values: list[float], index: int) -> float:
    return values[index] - math.log(sum(math.exp(v) for v in values))


def full_logit_scores(logits: torch.Tensor, labels: torch.Tensor) -> RowScores:
    """The reference: log-softmax over the whole (B x T x V) logits, read at the target tokens."""
    logits, labels, mask = shifted(logits, labels)
    log_softmax = logits.double().log_softmax(-1)
    rows, positions = mask.nonzero(as_tuple=True)
    targets = labels[rows, positions]
    return rows_from_tokens(log_softmax[rows, positions, targets], logits[rows, positions].argmax(-1), targets,
                            rows, labels.shape[0])


def test_row_scores_on_multi_token_targets_and_padding():
    logits, labels = hand_built()
    scores = full_logit_scores(logits, labels)
    torch.testing.assert_close(scores.token_accuracy, torch.tensor([2 / 3, 0.0], dtype=torch.float64))
    assert scores.num_tokens.tolist() == [3, 1]
    assert [p.tolist() for p in scores.predictions] == [[2, 1, 1], [0]]
    expected = [log_softmax_at([0, 0, 2, 0], 2) + log_softmax_at([0, 3, 0, 1], 3) + log_softmax_at([0, 1, 0, 0], 1),
                log_softmax_at([1, 0, 0, 0], 2)]
    torch.testing.assert_close(scores.log_prob_sum, torch.tensor(expected, dtype=torch.float64))
    torch.testing.assert_close(scores.mean_log_prob, torch.tensor([expected[0] / 3, expected[1]], dtype=torch.float64))
    assert perplexity(scores) == pytest.approx(math.exp(-sum(expected) / 4))


def test_requests_average_their_rows_and_metrics_skip_requests_without_rows():
    rows = torch.tensor([1.0, 0.0, 0.5, 1.0])
    per_request = per_request_mean(rows, torch.tensor([0, 0, 2, 2]), 3)
    assert per_request[0] == 0.5 and per_request[2] == 0.75 and per_request[1].isnan()
    summary = mean_over_requests({"generalization": per_request, "cf_efficacy_score": torch.full((3,), math.nan)})
    assert summary == {"generalization": pytest.approx(0.625), "cf_efficacy_score": None}


def test_agreement_and_probability_comparison():
    reference = [torch.tensor([1, 2, 3]), torch.tensor([4]), torch.tensor([], dtype=torch.long)]
    current = [torch.tensor([1, 0, 3]), torch.tensor([4]), torch.tensor([], dtype=torch.long)]
    result = agreement(reference, current)
    assert result[:2].tolist() == pytest.approx([2 / 3, 1.0]) and result[2].isnan()
    assert prefers(torch.tensor([-1.0, -2.0, -3.0]), torch.tensor([-2.0, -2.0, -1.0])).tolist() == [1.0, 0.0, 0.0]


# --- scoring on a tiny random Llama over a small synthetic world's word-level vocabulary ---------------

def random_world_model(num_subjects: int = 24, seed: int = 0):
    """A small synthetic world, its word-level tokenizer and an untrained tiny Llama over it (frozen, eval)."""
    world = build_world({"num_subjects": num_subjects, "objects_per_relation": 4})
    tokenizer = build_tokenizer(world)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(model_config(tokenizer, {"hidden_size": 32, "intermediate_size": 64,
                                                      "num_hidden_layers": 2, "num_attention_heads": 2,
                                                      "num_key_value_heads": 2})).eval()
    model.requires_grad_(False)
    return world, tokenizer, model


@pytest.fixture(scope="module")
def tiny():
    world, tokenizer, model = random_world_model()
    return world, tokenizer, model, world.edit_requests(world.subjects[:8], seed=0, locality_per_request=2)


def one_row(batch: TokenizedBatch, row: int) -> TokenizedBatch:
    """Row `row` alone, without its padding."""
    length = int(batch.attention_mask[row].sum())
    return TokenizedBatch(**{f.name: None if getattr(batch, f.name) is None else
                             getattr(batch, f.name)[row:row + 1, :length] if getattr(batch, f.name).ndim == 2
                             else getattr(batch, f.name)[row:row + 1] for f in dataclasses.fields(batch)})


def test_chunked_scoring_equals_one_full_pass_per_row(tiny):
    """Rows sharing prompts (new and true targets) and targets of several lengths, scored together in
    chunks, give what a full-vocabulary pass over each row alone gives."""
    _, tokenizer, model, records = tiny
    collator = EditCollator(tokenizer)
    batch = TokenizedBatch.concat([collator(records[:9]).rephrase, collator(records[:9]).edit,
                                   collator([swapped_targets(r) for r in records[:9]]).edit])
    chunked = score_rows(model, batch, chunk_rows=4)
    assert len(chunked.predictions) == batch.num_rows > 16
    for row in range(batch.num_rows):
        single = one_row(batch, row)
        alone = full_logit_scores(forward_logits(model, single), single.labels)
        torch.testing.assert_close(chunked.log_prob_sum[row:row + 1], alone.log_prob_sum, rtol=1e-5, atol=1e-5)
        assert chunked.predictions[row].tolist() == alone.predictions[0].tolist()
        assert chunked.num_tokens[row] == alone.num_tokens[0]


def test_scoring_plan_runs_each_needed_prefix_once():
    """Row 1's needed tokens are a prefix of row 0's, row 2 repeats row 0: one sequence serves all three."""
    ids = torch.tensor([[5, 6, 7, 8, 0], [5, 6, 9, 0, 0], [5, 6, 7, 8, 0], [5, 4, 3, 2, 1]])
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    labels = torch.tensor([[-100, -100, 7, 8, -100], [-100, -100, 9, -100, -100], [-100, -100, 7, 8, -100],
                           [-100, -100, -100, -100, 1]])
    plan = scoring_plan(TokenizedBatch(ids, mask, labels, mask.bool(), torch.arange(4)))
    assert plan.sequences == [(5, 6, 7), (5, 4, 3, 2)]
    assert plan.token_sequence.tolist() == [0, 0, 0, 0, 0, 1]
    assert plan.token_position.tolist() == [1, 2, 1, 1, 2, 3]
    assert plan.token_target.tolist() == [7, 8, 9, 7, 8, 1]
    assert plan.tokens_run == 7
    with pytest.raises(ValueError, match="right-padded"):
        scoring_plan(TokenizedBatch(ids, mask.flip(-1), labels, mask.bool(), torch.arange(4)))


def greedy_reference(model, prompt_ids: list[int], steps: int) -> list[int]:
    """Unpadded greedy decoding, one token at a time, without a cache."""
    ids = list(prompt_ids)
    for _ in range(steps):
        ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt_ids):]


def test_greedy_exact_match_follows_unpadded_greedy_decoding(tiny):
    _, tokenizer, model, records = tiny
    special = set(tokenizer.all_special_ids)
    own_continuations = []
    for record in records:
        prompt_ids = tokenizer(record.prompt)["input_ids"]
        length = len(tokenizer(" " + record.target_new, add_special_tokens=False)["input_ids"])
        continuation = greedy_reference(model, prompt_ids, length)
        if not special & set(continuation):
            own_continuations.append(EditRecord(record.record_id, record.prompt, tokenizer.decode(continuation)))
    assert len(own_continuations) >= 6
    # prompts of different lengths and targets of 1-3 words, so left-padding and cut-off both matter
    mixed = [*own_continuations[:6], *records[:3]]
    batch = EditCollator(tokenizer)(mixed).edit
    matches = greedy_exact_match(score_rows(model, batch, chunk_rows=4))
    expected = [1.0] * 6 + [float(greedy_reference(model, tokenizer(r.prompt)["input_ids"], len(
        tokenizer(" " + r.target_new, add_special_tokens=False)["input_ids"])) ==
        tokenizer(" " + r.target_new, add_special_tokens=False)["input_ids"]) for r in records[:3]]
    assert matches.tolist() == expected


def test_probability_comparison_aligns_rows_with_their_requests(tiny):
    """Requests with and without target_true, with different numbers of rephrases and locality prompts,
    scored together must give what each request scores on its own."""
    _, tokenizer, model, records = tiny
    collator = EditCollator(tokenizer)
    mixed = [records[0], EditRecord("no-true", records[1].prompt, records[1].target_new,
                                    rephrase_prompts=records[1].rephrase_prompts, locality=records[1].locality),
             dataclasses.replace(records[2], rephrase_prompts=records[2].rephrase_prompts[:1],
                                 locality=records[2].locality[:1]),
             records[3]]
    scorer = RequestScorer(model, chunk_rows=3, collator=collator, generation=False)
    together = scorer.score(collator(mixed)).values
    assert together["cf_efficacy_score"][1].isnan() and together["cf_neighborhood_score"][1].isnan()
    for i, record in enumerate(mixed):
        if record.target_true is None:
            continue
        own, other = collator([record]), collator([swapped_targets(record)])
        for name, field in (("cf_efficacy_score", "edit"), ("cf_paraphrase_score", "rephrase"),
                            ("cf_neighborhood_score", "locality")):
            wins = prefers(score_rows(model, getattr(own, field), 8).mean_log_prob,
                           score_rows(model, getattr(other, field), 8).mean_log_prob)
            assert together[name][i].item() == pytest.approx(wins.mean().item()), (name, i)
        assert together["efficacy"][i] == score_rows(model, own.edit, 8).token_accuracy[0]


def test_agreement_with_own_predictions_is_one_and_perplexity_matches_the_model_loss(tiny):
    world, tokenizer, model, records = tiny
    collator = EditCollator(tokenizer)
    scorer = RequestScorer(model, chunk_rows=5)
    batch = collator(records[:7])
    first = scorer.score(batch)
    again = scorer.score(batch, reference=first.locality_predictions).values["specificity_agreement"]
    assert again.tolist() == [1.0] * 7
    texts = world.heldout_sentences(5)
    rows = text_rows(tokenizer, texts, None)
    total_nll = sum(model(**tokenizer([t], return_tensors="pt"), labels=tokenizer([t], return_tensors="pt")[
        "input_ids"]).loss.item() * (len(tokenizer(t)["input_ids"]) - 1) for t in texts)
    tokens = sum(len(tokenizer(t)["input_ids"]) - 1 for t in texts)
    assert perplexity(score_rows(model, rows, 2)) == pytest.approx(math.exp(total_nll / tokens), rel=1e-5)


def test_swapped_targets_puts_true_target_in_front_and_new_target_in_locality():
    record = EditRecord("r", "p", "new", target_true="old", rephrase_prompts=("q",),
                        locality=(LocalityPair("l1", "a1"), LocalityPair("l2", "a2")))
    swapped = swapped_targets(record)
    assert (swapped.target_new, swapped.rephrase_prompts) == ("old", ("q",))
    assert swapped.locality == (LocalityPair("l1", "new"), LocalityPair("l2", "new"))
