"""Per-request scores on tokenized batches: each function says in its name how it is computed.

Rows belong to requests through `request_index`; a request with several rows (rephrases, locality
prompts) scores the mean of its rows, and a metric is the mean over requests.
"""

from __future__ import annotations

import torch
from torch import nn

from rledit.editing.losses import forward_logits, per_row_token_accuracy, shifted


def per_request_mean(row_values: torch.Tensor, request_index: torch.Tensor, num_requests: int) -> torch.Tensor:
    """Mean of row values per request (NaN for requests without rows)."""
    sums = torch.zeros(num_requests, dtype=torch.float64, device=row_values.device)
    counts = torch.zeros(num_requests, dtype=torch.float64, device=row_values.device)
    sums.index_add_(0, request_index, row_values.double())
    counts.index_add_(0, request_index, torch.ones_like(row_values, dtype=torch.float64))
    return sums / counts


@torch.no_grad()
def teacher_forced_accuracy(model: nn.Module, batch, num_requests: int) -> torch.Tensor:
    """Per request: fraction of target tokens whose argmax under teacher forcing is the target token."""
    if batch.input_ids.shape[0] == 0:
        return torch.full((num_requests,), float("nan"), dtype=torch.float64)
    rows = per_row_token_accuracy(forward_logits(model, batch), batch.labels)
    return per_request_mean(rows, batch.request_index, num_requests).cpu()


@torch.no_grad()
def predicted_target_tokens(model: nn.Module, batch) -> list[torch.Tensor]:
    """The argmax tokens at each row's target positions (for agreement with another model)."""
    logits, _, mask = shifted(forward_logits(model, batch), batch.labels)
    predictions = logits.argmax(-1)
    return [predictions[i][mask[i]].cpu() for i in range(predictions.shape[0])]


def agreement(reference: list[torch.Tensor], current: list[torch.Tensor], request_index: torch.Tensor,
              num_requests: int) -> torch.Tensor:
    """Per request: fraction of target positions where two models predict the same token."""
    rows = torch.tensor([(r == c).float().mean().item() if len(r) else float("nan")
                         for r, c in zip(reference, current, strict=True)], dtype=torch.float64)
    return per_request_mean(rows, request_index.cpu(), num_requests)


@torch.no_grad()
def target_log_probs(model: nn.Module, batch) -> torch.Tensor:
    """Per row: the sum of log-probabilities of the target tokens (for probability comparisons)."""
    logits, labels, mask = shifted(forward_logits(model, batch), batch.labels)
    logp = logits.float().log_softmax(-1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    return (logp * mask).sum(-1).cpu()
