"""Losses and token-level scores on (prompt, target) batches, shared by editors, training and evaluation.

Labels follow the Hugging Face convention (aligned with input_ids, -100 on prompt and padding); the
logits at position i predict the token at i + 1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def shifted(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits predicting each next token, those tokens, mask of scored positions)."""
    logits, labels = logits[:, :-1], labels[:, 1:]
    return logits, labels, labels != -100


def target_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over all target tokens of the batch."""
    logits, labels, mask = shifted(logits, labels)
    return F.cross_entropy(logits[mask].float(), labels[mask])


def weighted_target_nll(logits: torch.Tensor, labels: torch.Tensor, row_weight: torch.Tensor) -> torch.Tensor:
    """sum over rows of row_weight x (summed cross-entropy of the row's target tokens)."""
    logits, labels, mask = shifted(logits, labels)
    nll = F.cross_entropy(logits.float().transpose(1, 2), labels.clamp(min=0), reduction="none")
    return ((nll * mask).sum(-1) * row_weight).sum()


def answer_log_probs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Log-probabilities at the scored positions, row-major: (number of scored positions, vocab).

    Only these positions enter a locality loss, so a reference distribution kept for later steps costs
    a few rows per prompt instead of the whole sequence's logits.
    """
    logits, _, mask = shifted(logits, labels)
    return logits[mask].float().log_softmax(-1)


def weighted_locality_kl(base_logp: torch.Tensor, edited_logits: torch.Tensor, labels: torch.Tensor,
                         row_weight: torch.Tensor) -> torch.Tensor:
    """sum over rows of row_weight x (summed KL(p_base || p_edited) over the row's answer positions).

    `base_logp` is `answer_log_probs` of the reference model on the same rows.
    """
    _, _, mask = shifted(edited_logits, labels)
    edited_logp = answer_log_probs(edited_logits, labels)
    kl = (base_logp.exp() * (base_logp - edited_logp)).sum(-1)
    return (kl * row_weight[:, None].expand_as(mask)[mask]).sum()


def forward_logits(model: nn.Module, batch) -> torch.Tensor:
    """Logits of `model` on a TokenizedBatch."""
    return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits


def logits_at(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
              positions: torch.Tensor) -> torch.Tensor:
    """Logits (number of True positions, vocab) at `positions` (B x T bool) only, row-major: the output head
    runs where a loss is scored instead of over every position and the whole vocabulary."""
    hidden = model.base_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    return output_logits(model, hidden[positions])


def output_logits(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """The model's output head (with its logit soft-capping, if any) on final hidden states."""
    logits = model.get_output_embeddings()(hidden)
    cap = getattr(model.config, "final_logit_softcapping", None)
    return logits if cap is None else torch.tanh(logits / cap) * cap
