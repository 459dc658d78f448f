"""Prompt + target sequences as the synthetic model is trained and scored on them.

Prompt and " " + target are tokenized separately, the way the data layer's collator does it, so the
model learns exactly the token sequences it will later be edited and evaluated on.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerFast

from rledit.data.collate import pad_right


@dataclass(frozen=True)
class EncodedBatch:
    """Right-padded ids with a mask of target positions.

    Right padding with a causal model needs no attention mask: padding only follows real tokens.
    """

    input_ids: torch.Tensor
    target_mask: torch.Tensor
    lengths: torch.Tensor

    def labels(self) -> torch.Tensor:
        """Language-modelling labels: every real token (the model shifts them), -100 on padding."""
        padding = torch.arange(self.input_ids.shape[1]) >= self.lengths[:, None]
        return self.input_ids.masked_fill(padding, -100)


def encode(tokenizer: PreTrainedTokenizerFast, prompts: Sequence[str], targets: Sequence[str],
           append_eos: bool = False) -> EncodedBatch:
    """BOS + prompt tokens + target tokens (+ EOS, which is part of the target when appended)."""
    prompt_ids = tokenizer(list(prompts))["input_ids"]
    target_ids = tokenizer([" " + target for target in targets], add_special_tokens=False)["input_ids"]
    if append_eos:
        target_ids = [ids + [tokenizer.eos_token_id] for ids in target_ids]
    input_ids, attention_mask = pad_right([p + t for p, t in zip(prompt_ids, target_ids, strict=True)],
                                          tokenizer.pad_token_id)
    target_mask = torch.zeros(input_ids.shape, dtype=torch.bool)
    for row, (prompt, target) in enumerate(zip(prompt_ids, target_ids, strict=True)):
        target_mask[row, len(prompt):len(prompt) + len(target)] = True
    return EncodedBatch(input_ids, target_mask, attention_mask.sum(dim=1))
