"""Scoring edit requests on a model's current weights, a bounded number of rows per forward pass.

Batches (right-padded, as the collator makes them) stay on the CPU and go to the model's device one
chunk of rows at a time, each chunk trimmed to its own longest row, so that evaluating thousands of
requests costs no more memory than a chunk.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers import GenerationConfig, PreTrainedTokenizerBase

from rledit.data.collate import IGNORE_INDEX, EditBatch, EditCollator, TokenizedBatch, pad_right
from rledit.data.records import EditRecord, LocalityPair
from rledit.editing.losses import forward_logits
from rledit.errors import ConfigError
from rledit.evaluation.metrics import (
    RowScores,
    agreement,
    mean_over_requests,
    per_request_mean,
    perplexity,
    prefers,
    row_scores,
)

CF_SCORES = ("cf_efficacy_score", "cf_paraphrase_score", "cf_neighborhood_score")
"""CounterFact's comparisons on edit, rephrase and locality (neighbourhood) prompts, in that order."""


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def row_chunks(batch: TokenizedBatch, size: int) -> Iterator[TokenizedBatch]:
    """Consecutive chunks of at most `size` rows, each without the padding columns no row of it uses."""
    for start in range(0, batch.num_rows, size):
        yield batch.rows(start, start + size)


@torch.no_grad()
def score_rows(model: nn.Module, batch: TokenizedBatch, chunk_rows: int) -> RowScores:
    """Teacher-forced scores of every row of `batch`, `chunk_rows` rows per forward pass."""
    device = model_device(model)
    parts = [row_scores(forward_logits(model, chunk.to(device)), chunk.labels.to(device))
             for chunk in row_chunks(batch, chunk_rows)]
    if not parts:
        empty = torch.zeros(0, dtype=torch.float64)
        return RowScores(empty, empty, torch.zeros(0, dtype=torch.long), [])
    return RowScores.concat(parts)


@torch.no_grad()
def greedy_exact_match(model: nn.Module, batch: TokenizedBatch, chunk_rows: int, pad_token_id: int) -> torch.Tensor:
    """Per row: 1.0 if greedy decoding after the prompt yields exactly the row's target tokens.

    Rows are right-padded (prompt + target); here each prompt is re-packed left-padded, so every row's
    next token comes right after its prompt and `generate` derives positions from the attention mask.
    """
    device = model_device(model)
    matches: list[float] = []
    for chunk in row_chunks(batch.to("cpu"), chunk_rows):
        prompts, targets = [], []
        for ids, attended, labels in zip(chunk.input_ids, chunk.attention_mask.bool(), chunk.labels, strict=True):
            is_target = labels != IGNORE_INDEX
            prompts.append(ids[attended & ~is_target])
            targets.append(labels[is_target])
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            input_ids[row, width - len(prompt):] = prompt
            attention_mask[row, width - len(prompt):] = 1
        config = GenerationConfig(max_new_tokens=max(len(t) for t in targets), do_sample=False, num_beams=1,
                                  pad_token_id=pad_token_id)
        generated = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                   generation_config=config)[:, width:].cpu()
        matches.extend(float(generated[row, :len(t)].tolist() == t.tolist()) for row, t in enumerate(targets))
    return torch.tensor(matches, dtype=torch.float64)


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
    model's locality predictions. With a collator, optionally the CounterFact probability comparison
    (requests that have a target_true) and greedy-generation exact match.
    """

    def __init__(self, model: nn.Module, chunk_rows: int, collator: EditCollator | None = None,
                 probability_comparison: bool = True, generation: bool = True):
        if chunk_rows < 1:
            raise ConfigError(f"eval_batch_size must be >= 1, got {chunk_rows}")
        self.model, self.chunk_rows, self.collator = model, chunk_rows, collator
        self.probability_comparison = probability_comparison and collator is not None
        self.generation = generation and collator is not None

    def score(self, batch: EditBatch, reference: Sequence[Sequence[torch.Tensor]] | None = None) -> RequestScores:
        """Scores of the requests of `batch`; `reference` is the pre-edit locality predictions of the same requests."""
        n = len(batch.records)
        edit = score_rows(self.model, batch.edit, self.chunk_rows)
        rephrase = score_rows(self.model, batch.rephrase, self.chunk_rows)
        locality = score_rows(self.model, batch.locality, self.chunk_rows)
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
            values.update(self._probability_comparison(batch, edit, rephrase, locality))
        if self.generation:
            values["generation_exact_match"] = per_request_mean(
                greedy_exact_match(self.model, batch.edit, self.chunk_rows, self.collator.tokenizer.pad_token_id),
                batch.edit.request_index, n)
        return RequestScores(values, predictions)

    def _probability_comparison(self, batch: EditBatch, edit: RowScores, rephrase: RowScores,
                                locality: RowScores) -> dict[str, torch.Tensor]:
        """CounterFact's three scores for the requests with a target_true (NaN for the others).

        Each compares a row's own target with the swapped record's target on the same prompt: new over
        true on edit and rephrase prompts, the true answer over new on locality prompts.
        """
        n = len(batch.records)
        has_true = torch.tensor([r.target_true is not None for r in batch.records], dtype=torch.bool)
        positions = has_true.nonzero().flatten()
        scores = {name: torch.full((n,), torch.nan, dtype=torch.float64) for name in CF_SCORES}
        if not len(positions):
            return scores
        swapped = self.collator([swapped_targets(batch.records[i]) for i in positions.tolist()])
        for name, own, own_rows, other_rows in zip(CF_SCORES, (edit, rephrase, locality),
                                                   (batch.edit, batch.rephrase, batch.locality),
                                                   (swapped.edit, swapped.rephrase, swapped.locality), strict=True):
            own = own.select(has_true[own_rows.request_index.cpu()])
            other = score_rows(self.model, other_rows, self.chunk_rows)
            wins = prefers(own.mean_log_prob, other.mean_log_prob)
            scores[name].index_copy_(0, positions, per_request_mean(wins, other_rows.request_index, len(positions)))
        return scores


def heldout_perplexity(model: nn.Module, heldout: TokenizedBatch, chunk_rows: int) -> float:
    return perplexity(score_rows(model, heldout, chunk_rows))


def _group_by_request(rows: Sequence[torch.Tensor], request_index: torch.Tensor, n: int) -> list[list[torch.Tensor]]:
    grouped: list[list[torch.Tensor]] = [[] for _ in range(n)]
    for row, request in zip(rows, request_index.tolist(), strict=True):
        grouped[request].append(row)
    return grouped
