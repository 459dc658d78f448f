"""Scoring edit requests on a model's current weights, with no more forward work than the metrics need.

Every metric here is teacher-forced: it needs the logits that predict each target token, nothing else.
So a row is run only up to its last target token; rows whose tokens are a prefix of another row's
(the same prompt with the new and the true target, a one-token target and a longer one) are read off
that row's forward pass; the output head runs only where a target token is predicted; and rows go
through the model sorted by length, `chunk_rows` at a time, so that padding is small and memory bounded.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from rledit.data.collate import IGNORE_INDEX, EditBatch, EditCollator, TokenizedBatch, pad_right
from rledit.data.records import EditRecord, LocalityPair
from rledit.editing.losses import logits_at
from rledit.errors import ConfigError
from rledit.evaluation.metrics import (
    RowScores,
    agreement,
    mean_over_requests,
    per_request_mean,
    perplexity,
    prefers,
    rows_from_tokens,
)

CF_SCORES = ("cf_efficacy_score", "cf_paraphrase_score", "cf_neighborhood_score")
"""CounterFact's comparisons on edit, rephrase and locality (neighbourhood) prompts, in that order."""


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@dataclass(frozen=True)
class ScoringPlan:
    """The forward passes that score a batch's rows: each distinct needed prefix once, inside the longest
    prefix that contains it.

    Target token k (row-major over the batch, in position order) of row `token_row[k]` is predicted by
    the logits at `token_position[k]` of sequence `sequences[token_sequence[k]]`.
    """

    sequences: list[tuple[int, ...]]
    """Token sequences to run, shortest first."""
    token_sequence: torch.Tensor
    token_position: torch.Tensor
    token_target: torch.Tensor
    token_row: torch.Tensor
    num_rows: int

    @property
    def tokens_run(self) -> int:
        """Tokens the forward passes process, padding excluded."""
        return sum(len(s) for s in self.sequences)


def scoring_plan(batch: TokenizedBatch) -> ScoringPlan:
    """Plan the forward passes for the right-padded rows of `batch` (see ScoringPlan)."""
    ids, mask, labels = batch.input_ids.cpu(), batch.attention_mask.cpu(), batch.labels.cpu()
    if not torch.equal(mask.cumprod(-1), mask):
        raise ValueError("scoring needs right-padded rows (attention_mask 1...1 0...0), as EditCollator makes them")
    token_row, token_position = (labels[:, 1:] != IGNORE_INDEX).nonzero(as_tuple=True)
    last = torch.full((ids.shape[0],), -1, dtype=torch.long).scatter_reduce_(0, token_row, token_position, "amax")
    needed = {row: tuple(ids[row, :last[row] + 1].tolist()) for row in token_row.unique().tolist()}
    distinct = sorted(set(needed.values()))
    # In lexicographic order a sequence that is a prefix of any other is a prefix of the one right after it.
    carrier: dict[tuple[int, ...], tuple[int, ...]] = {}
    for i in reversed(range(len(distinct))):
        after = distinct[i + 1] if i + 1 < len(distinct) else ()
        carrier[distinct[i]] = carrier[after] if after[:len(distinct[i])] == distinct[i] else distinct[i]
    sequences = sorted(set(carrier.values()), key=len)
    index = {sequence: k for k, sequence in enumerate(sequences)}
    row_sequence = {row: index[carrier[prefix]] for row, prefix in needed.items()}
    token_sequence = torch.tensor([row_sequence[row] for row in token_row.tolist()], dtype=torch.long)
    return ScoringPlan(sequences, token_sequence, token_position, labels[token_row, token_position + 1],
                       token_row, ids.shape[0])


@torch.no_grad()
def score_rows(model: nn.Module, batch: TokenizedBatch, chunk_rows: int, phase: str | None = None) -> RowScores:
    """Teacher-forced scores of every row of `batch`, `chunk_rows` sequences per forward pass; with a
    `phase` name, a progress bar over the sequences says what is being scored."""
    plan = scoring_plan(batch)
    device = model_device(model)
    log_probs = torch.zeros(len(plan.token_row), dtype=torch.float64)
    predicted = torch.zeros(len(plan.token_row), dtype=torch.long)
    bar = tqdm(total=len(plan.sequences), desc=phase, unit="seq", disable=phase is None, leave=False)
    for start in range(0, len(plan.sequences), chunk_rows):
        input_ids, attention_mask = pad_right(plan.sequences[start:start + chunk_rows], 0)
        bar.update(input_ids.shape[0])
        tokens = ((plan.token_sequence >= start) & (plan.token_sequence < start + chunk_rows)).nonzero().flatten()
        rows, positions = plan.token_sequence[tokens] - start, plan.token_position[tokens]
        scored = torch.zeros_like(attention_mask, dtype=torch.bool)
        scored[rows, positions] = True
        logits = logits_at(model, input_ids.to(device), attention_mask.to(device), scored.to(device)).float()
        slot = (scored.flatten().cumsum(0) - 1).view_as(scored)[rows, positions].to(device)
        targets = plan.token_target[tokens].to(device)
        log_probs[tokens] = (logits[slot, targets] - logits.logsumexp(-1)[slot]).double().cpu()
        predicted[tokens] = logits.argmax(-1)[slot].cpu()
    bar.close()
    return rows_from_tokens(log_probs, predicted, plan.token_target, plan.token_row, plan.num_rows)


def text_rows(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], max_length: int | None) -> TokenizedBatch:
    """Held-out sentences as right-padded rows whose every token after the first is a target (for perplexity)."""
    if not texts:
        raise ConfigError("held-out text for perplexity is empty")
    encoded = tokenizer(list(texts), truncation=max_length is not None, max_length=max_length)["input_ids"]
    input_ids, attention_mask = pad_right(encoded, tokenizer.pad_token_id)
    labels = input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
    target_mask = torch.zeros_like(attention_mask, dtype=torch.bool)
    target_mask[:, :-1] = attention_mask[:, 1:].bool()
    return TokenizedBatch(input_ids, attention_mask, labels, target_mask, torch.arange(len(encoded)))


def swapped_targets(record: EditRecord) -> EditRecord:
    """The record with target_true as its new target and target_new as every locality answer.

    Collated, it gives the rows CounterFact compares against: P(true) on the edit and rephrase prompts,
    P(new) on the neighbourhood prompts, row for row aligned with the record's own rows.
    """
    return dataclasses.replace(record, target_new=record.target_true,
                               locality=tuple(LocalityPair(p.prompt, record.target_new) for p in record.locality))


@dataclass
class RequestScores:
    """Per-request values of each metric (NaN where a request has nothing to score), and the model's
    argmax at the locality answers (per request, per locality prompt) for agreement with a later model."""

    values: dict[str, torch.Tensor]
    locality_predictions: list[list[torch.Tensor]]

    def summary(self) -> dict[str, float | None]:
        return mean_over_requests(self.values)

    @staticmethod
    def concat(parts: Sequence[RequestScores]) -> RequestScores:
        return RequestScores({name: torch.cat([p.values[name] for p in parts]) for name in parts[0].values},
                             [preds for p in parts for preds in p.locality_predictions])


class RequestScorer:
    """Scores edit requests on the model's current weights.

    Always: efficacy, generalization, specificity, and specificity_agreement when given the pre-edit
    model's locality predictions; optionally greedy-generation exact match. With a collator, optionally
    the CounterFact probability comparison (requests that have a target_true).
    """

    def __init__(self, model: nn.Module, chunk_rows: int, collator: EditCollator | None = None,
                 probability_comparison: bool = True, generation: bool = True):
        if chunk_rows < 1:
            raise ConfigError(f"eval_batch_size must be >= 1, got {chunk_rows}")
        self.model, self.chunk_rows, self.collator = model, chunk_rows, collator
        self.probability_comparison = probability_comparison and collator is not None
        self.generation = generation

    def score(self, batch: EditBatch, reference: Sequence[Sequence[torch.Tensor]] | None = None,
              phase: str | None = None) -> RequestScores:
        """Scores of the requests of `batch`; `reference` is the pre-edit locality predictions of the same
        requests; `phase` names the progress bar (none without it)."""
        n = len(batch.records)
        own = (batch.edit, batch.rephrase, batch.locality)
        has_true = torch.tensor([r.target_true is not None for r in batch.records], dtype=torch.bool)
        swapped = None
        if self.probability_comparison and has_true.any():
            swapped = self.collator([swapped_targets(r) for r, keep in zip(batch.records, has_true) if keep])
        # One pass over all rows, so that each prompt runs once for its new and its true target.
        parts = [*own, swapped.edit, swapped.rephrase, swapped.locality] if swapped is not None else list(own)
        scores = score_rows(self.model, TokenizedBatch.concat([p.to("cpu") for p in parts]), self.chunk_rows,
                            phase)
        edit, rephrase, locality, *other = scores.split([p.num_rows for p in parts])
        values = {"efficacy": per_request_mean(edit.token_accuracy, batch.edit.request_index, n),
                  "generalization": per_request_mean(rephrase.token_accuracy, batch.rephrase.request_index, n),
                  "specificity": per_request_mean(locality.token_accuracy, batch.locality.request_index, n)}
        predictions = _group_by_request(locality.predictions, batch.locality.request_index, n)
        if reference is not None:
            if len(reference) != n:
                raise ValueError(f"reference predictions cover {len(reference)} requests, the batch has {n}")
            values["specificity_agreement"] = per_request_mean(
                agreement([p for request in reference for p in request], locality.predictions),
                batch.locality.request_index, n)
        if self.probability_comparison:
            values.update(_probability_comparison(has_true, own, (edit, rephrase, locality), swapped, other))
        if self.generation:
            values["generation_exact_match"] = per_request_mean(greedy_exact_match(edit), batch.edit.request_index, n)
        return RequestScores(values, predictions)


def greedy_exact_match(edit: RowScores) -> torch.Tensor:
    """Per row: 1.0 if greedy decoding after the prompt yields exactly the row's target tokens.

    This needs no decoding: greedy decoding reproduces the target exactly when, and only when, at every
    target position the argmax given the target's own earlier tokens is the next target token, which is
    what the teacher-forced pass already computed (the contexts coincide as long as the tokens match).
    """
    return ((edit.token_accuracy == 1.0) & (edit.num_tokens > 0)).double()


def _probability_comparison(has_true: torch.Tensor, own_rows: Sequence[TokenizedBatch], own: Sequence[RowScores],
                            swapped: EditBatch | None, other: Sequence[RowScores]) -> dict[str, torch.Tensor]:
    """CounterFact's three scores for the requests with a target_true (NaN for the others).

    Each compares a row's own target with the swapped record's target on the same prompt: new over
    true on edit and rephrase prompts, the true answer over new on locality prompts.
    """
    positions = has_true.nonzero().flatten()
    scores = {name: torch.full((len(has_true),), torch.nan, dtype=torch.float64) for name in CF_SCORES}
    if swapped is None:
        return scores
    for name, own_scores, rows, other_rows, other_scores in zip(
            CF_SCORES, own, own_rows, (swapped.edit, swapped.rephrase, swapped.locality), other, strict=True):
        own_scores = own_scores.select(has_true[rows.request_index.cpu()])
        wins = prefers(own_scores.mean_log_prob, other_scores.mean_log_prob)
        scores[name].index_copy_(0, positions, per_request_mean(wins, other_rows.request_index, len(positions)))
    return scores


def heldout_perplexity(model: nn.Module, heldout: TokenizedBatch, chunk_rows: int, phase: str | None = None) -> float:
    return perplexity(score_rows(model, heldout, chunk_rows, phase))


def _group_by_request(rows: Sequence[torch.Tensor], request_index: torch.Tensor, n: int) -> list[list[torch.Tensor]]:
    grouped: list[list[torch.Tensor]] = [[] for _ in range(n)]
    for row, request in zip(rows, request_index.tolist(), strict=True):
        grouped[request].append(row)
    return grouped
