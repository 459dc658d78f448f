"""What a teacher-forced forward pass says about each row's target tokens, and how rows become requests.

Rows belong to requests through `request_index`; a request with several rows (rephrases, locality
prompts) scores the mean of its rows, and a metric is the mean over the requests that have rows.
Everything here works on logits and tensors, so the tests can check it on hand-built numbers.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

METRIC_DEFINITIONS: dict[str, str] = {
    "efficacy": "teacher-forced token accuracy of target_new after the edit prompt: fraction of target tokens "
                "whose argmax is right, per request, averaged over requests",
    "generalization": "teacher-forced token accuracy of target_new after each rephrase prompt, averaged over a "
                      "request's rephrases, then over requests",
    "specificity": "teacher-forced token accuracy of the true answers of the locality prompts, averaged over a "
                   "request's locality prompts, then over requests",
    "specificity_agreement": "fraction of locality answer positions where the model's argmax equals the "
                             "pre-edit model's argmax, per request, averaged over requests",
    "cf_efficacy_score": "CounterFact probability comparison on the edit prompt: 1 if mean per-token log P(target_new) "
                         "> mean per-token log P(target_true), averaged over requests that have a target_true",
    "cf_paraphrase_score": "the same comparison on each rephrase prompt, averaged over a request's rephrases, then "
                           "over requests that have a target_true",
    "cf_neighborhood_score": "CounterFact neighbourhood comparison on each locality prompt: 1 if mean per-token "
                             "log P(its true answer) > mean per-token log P(target_new), averaged per request, "
                             "then over requests that have a target_true",
    "generation_exact_match": "greedy decoding from the edit prompt, as many tokens as target_new has, reproduces "
                              "target_new's tokens exactly; averaged over requests",
    "perplexity": "exp of the mean next-token negative log-likelihood over every token of the held-out text",
}


@dataclass(frozen=True)
class RowScores:
    """Per-row results of one teacher-forced pass: accuracy, log-probability and argmax at target positions."""

    token_accuracy: torch.Tensor
    """(rows,) fraction of target tokens whose argmax is the target token."""
    log_prob_sum: torch.Tensor
    """(rows,) sum of the log-probabilities of the target tokens."""
    num_tokens: torch.Tensor
    """(rows,) number of target tokens."""
    predictions: list[torch.Tensor]
    """Per row, the argmax tokens at its target positions."""

    @property
    def mean_log_prob(self) -> torch.Tensor:
        """(rows,) mean per-token log-probability of the target (length-normalized, as CounterFact compares)."""
        return self.log_prob_sum / self.num_tokens.clamp(min=1)

    def select(self, rows: torch.Tensor) -> RowScores:
        """The scores of the rows where the boolean mask `rows` is True."""
        kept = rows.nonzero().flatten().tolist()
        return RowScores(self.token_accuracy[rows], self.log_prob_sum[rows], self.num_tokens[rows],
                         [self.predictions[i] for i in kept])

    def split(self, sizes: Sequence[int]) -> list[RowScores]:
        """Consecutive parts of `sizes` rows each (the inverse of concat)."""
        bounds = [0, *torch.tensor(list(sizes)).cumsum(0).tolist()]
        return [RowScores(self.token_accuracy[a:b], self.log_prob_sum[a:b], self.num_tokens[a:b],
                          self.predictions[a:b]) for a, b in itertools.pairwise(bounds)]

    @staticmethod
    def concat(parts: Sequence[RowScores]) -> RowScores:
        return RowScores(torch.cat([p.token_accuracy for p in parts]), torch.cat([p.log_prob_sum for p in parts]),
                         torch.cat([p.num_tokens for p in parts]), [t for p in parts for t in p.predictions])


def rows_from_tokens(log_probs: torch.Tensor, predicted: torch.Tensor, targets: torch.Tensor,
                     row_of_token: torch.Tensor, num_rows: int) -> RowScores:
    """Per-row scores from per-target-token log-probabilities and argmax predictions.

    `row_of_token` says which row each token belongs to; a row's tokens are in position order. Rows
    without tokens score 0 tokens. Results are on the CPU, in fp64.
    """
    row_of_token, targets, predicted = row_of_token.cpu(), targets.cpu(), predicted.cpu()
    order = torch.sort(row_of_token, stable=True).indices
    num_tokens = torch.zeros(num_rows, dtype=torch.long).index_add_(0, row_of_token, torch.ones_like(row_of_token))
    hits = torch.zeros(num_rows, dtype=torch.float64).index_add_(0, row_of_token, (predicted == targets).double())
    log_prob_sum = torch.zeros(num_rows, dtype=torch.float64).index_add_(0, row_of_token, log_probs.double().cpu())
    return RowScores(hits / num_tokens.clamp(min=1), log_prob_sum, num_tokens,
                     list(predicted[order].split(num_tokens.tolist())))


def per_request_mean(row_values: torch.Tensor, request_index: torch.Tensor, num_requests: int) -> torch.Tensor:
    """Mean of row values per request (NaN for requests without rows)."""
    sums = torch.zeros(num_requests, dtype=torch.float64)
    counts = torch.zeros(num_requests, dtype=torch.float64)
    sums.index_add_(0, request_index.cpu(), row_values.double().cpu())
    counts.index_add_(0, request_index.cpu(), torch.ones(len(row_values), dtype=torch.float64))
    return sums / counts


def agreement(reference: Sequence[torch.Tensor], current: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per row: fraction of target positions where two models predict the same token (NaN for empty rows)."""
    return torch.tensor([(r == c).double().mean().item() if len(r) else math.nan
                         for r, c in zip(reference, current, strict=True)], dtype=torch.float64)


def prefers(first_log_prob: torch.Tensor, second_log_prob: torch.Tensor) -> torch.Tensor:
    """Per row: 1.0 where the first target is more probable than the second (strictly), else 0.0."""
    return (first_log_prob > second_log_prob).double()


def perplexity(scores: RowScores) -> float:
    """exp of the mean negative log-likelihood over every scored token of every row."""
    total = int(scores.num_tokens.sum())
    return math.exp(-float(scores.log_prob_sum.sum()) / total) if total else math.nan


def mean_over_requests(values: Mapping[str, torch.Tensor]) -> dict[str, float | None]:
    """Each metric's mean over the requests where it is defined; None where no request defines it."""
    summary: dict[str, float | None] = {}
    for name, per_request in values.items():
        defined = per_request[~per_request.isnan()]
        summary[name] = float(defined.mean()) if len(defined) else None
    return summary
