"""Tokenization of (prompt, target) pairs and collation of edit requests into padded tensors.

A row is `prompt tokens + tokens of " " + target`; only the target tokens carry labels. Labels follow the
Hugging Face convention (the model shifts them), so the logits at position i predict labels[i + 1]:
`target_mask` marks those positions, which is where the factor-capture hooks read keys and gradients.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch
from transformers import PreTrainedTokenizerBase

from rledit.data.records import EditRecord
from rledit.errors import ConfigError, DataError

IGNORE_INDEX = -100


@dataclass(frozen=True)
class TokenizedBatch:
    """Padded rows (B x T) of prompt + target, with labels on target tokens only."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    target_mask: torch.Tensor
    """True at positions whose output logits predict a target token (labels[:, i + 1] != -100)."""
    request_index: torch.Tensor
    """(B,) which edit request of the batch each row belongs to."""
    subject_first: torch.Tensor | None = None
    """(B,) position of the row's first subject token, -1 where its prompt holds no subject; None: not
    located (rows that are not edit requests)."""
    subject_last: torch.Tensor | None = None
    """(B,) position of the row's last subject token (-1, None: as subject_first). Locate-then-edit
    editors read their keys there."""

    def to(self, device: torch.device | str) -> TokenizedBatch:
        return TokenizedBatch(**{f.name: _to(getattr(self, f.name), device) for f in fields(self)})

    @property
    def num_rows(self) -> int:
        return self.input_ids.shape[0]

    def rows(self, start: int, stop: int) -> TokenizedBatch:
        """Rows [start, stop), with the columns that are padding in all of them dropped (right padding)."""
        width = int(self.attention_mask[start:stop].sum(-1).max()) if stop > start else 0

        def part(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t[start:stop, :width] if t.ndim == 2 else t[start:stop]

        return TokenizedBatch(**{f.name: part(getattr(self, f.name)) for f in fields(self)})

    @staticmethod
    def concat(batches: Sequence[TokenizedBatch]) -> TokenizedBatch:
        """Stack right-padded batches of different widths into one right-padded batch."""
        width = max(b.input_ids.shape[1] for b in batches)

        def padded(t: torch.Tensor, value) -> torch.Tensor:
            return torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value)

        return TokenizedBatch(
            input_ids=torch.cat([padded(b.input_ids, 0) for b in batches]),
            attention_mask=torch.cat([padded(b.attention_mask, 0) for b in batches]),
            labels=torch.cat([padded(b.labels, IGNORE_INDEX) for b in batches]),
            target_mask=torch.cat([padded(b.target_mask, False) for b in batches]),
            request_index=torch.cat([b.request_index for b in batches]),
            subject_first=_cat_located([b.subject_first for b in batches]),
            subject_last=_cat_located([b.subject_last for b in batches]))


def _cat_located(parts: Sequence[torch.Tensor | None]) -> torch.Tensor | None:
    return None if any(p is None for p in parts) else torch.cat(list(parts))


def pad_right(rows: Sequence[Sequence[int]], value: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows of different lengths as one right-padded (B x T) tensor filled with `value`, and the mask
    (1 on real tokens)."""
    width = max(len(r) for r in rows)
    padded = torch.full((len(rows), width), value, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        padded[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, :len(r)] = 1
    return padded, mask


def _to(t: torch.Tensor | None, device: torch.device | str) -> torch.Tensor | None:
    return None if t is None else t.to(device)


@dataclass(frozen=True)
class EditBatch:
    """One batch of edit requests, tokenized four ways.

    `edit`: prompt -> target_new; `rephrase`: every rephrase prompt -> target_new; `locality`: every
    locality prompt -> its answer; `true`: prompt -> target_true, rows only for records that have one.
    """

    records: list[EditRecord]
    edit: TokenizedBatch
    rephrase: TokenizedBatch
    locality: TokenizedBatch
    true: TokenizedBatch

    def to(self, device: torch.device | str) -> EditBatch:
        return EditBatch(records=self.records, edit=self.edit.to(device), rephrase=self.rephrase.to(device),
                         locality=self.locality.to(device), true=self.true.to(device))


@dataclass(frozen=True)
class _Pair:
    """One row to tokenize, with where it came from (for error messages)."""

    prompt: str
    target: str
    request_index: int
    record_id: str
    field: str
    subject: str | None = None


def _edit_pairs(records: Sequence[EditRecord]) -> list[_Pair]:
    return [_Pair(r.prompt, r.target_new, i, r.record_id, "prompt", r.subject) for i, r in enumerate(records)]


def _rephrase_pairs(records: Sequence[EditRecord]) -> list[_Pair]:
    return [_Pair(prompt, r.target_new, i, r.record_id, f"rephrase_prompts[{j}]", r.subject)
            for i, r in enumerate(records) for j, prompt in enumerate(r.rephrase_prompts)]


def _locality_pairs(records: Sequence[EditRecord]) -> list[_Pair]:
    return [_Pair(pair.prompt, pair.answer, i, r.record_id, f"locality[{j}]")
            for i, r in enumerate(records) for j, pair in enumerate(r.locality)]


def _true_pairs(records: Sequence[EditRecord]) -> list[_Pair]:
    return [_Pair(r.prompt, r.target_true, i, r.record_id, "target_true", r.subject)
            for i, r in enumerate(records) if r.target_true is not None]


class EditCollator:
    """Turns a list of EditRecords into an EditBatch of right-padded rows (a callable, so it can serve as a
    collate_fn). Right padding only: scoring reads a row up to its last target token and stacks rows by it."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, max_length: int | None = None):
        if tokenizer.pad_token_id is None:
            raise ConfigError(f"tokenizer {type(tokenizer).__name__} has no pad token; set "
                              "tokenizer.pad_token (for example to its eos token) before collating")
        if max_length is not None and max_length < 2:
            raise ConfigError(f"max_length must be >= 2 (a prompt and a target token), got {max_length}")
        self.tokenizer, self.max_length = tokenizer, max_length

    def row_problems(self, records: Sequence[EditRecord]) -> list[tuple[str, str] | None]:
        """For each record, its first row that cannot be collated, as (field, problem), or None.

        A row cannot be collated when its prompt or target has no tokens or prompt + target are longer than
        max_length. All records go through the tokenizer together, so loading can afford to check every
        record and refuse or skip the bad ones before any edit is made.
        """
        pairs = [pair for rows_of in (_edit_pairs, _rephrase_pairs, _locality_pairs, _true_pairs)
                 for pair in rows_of(records)]
        problems: list[tuple[str, str] | None] = [None] * len(records)
        if not pairs:
            return problems
        for pair, prompt, target in zip(pairs, *self._encode(pairs), strict=True):
            problem = self._length_problem(pair, len(prompt), len(target))
            if problem is not None and problems[pair.request_index] is None:
                problems[pair.request_index] = (pair.field, problem)
        return problems

    def __call__(self, records: Sequence[EditRecord]) -> EditBatch:
        return EditBatch(records=list(records), edit=self._tokenize(_edit_pairs(records), locate_subjects=True),
                         rephrase=self._tokenize(_rephrase_pairs(records), locate_subjects=True),
                         locality=self._tokenize(_locality_pairs(records)),
                         true=self._tokenize(_true_pairs(records), locate_subjects=True))

    def rows(self, prompts: Sequence[str], targets: Sequence[str],
             subjects: Sequence[str | None] | None = None) -> TokenizedBatch:
        """Rows for (prompt, target) pairs outside any record (an editor's own prompts), subjects located
        when given; row i belongs to request i."""
        subjects = [None] * len(prompts) if subjects is None else subjects
        pairs = [_Pair(p, t, i, f"row {i}", "prompt", s)
                 for i, (p, t, s) in enumerate(zip(prompts, targets, subjects, strict=True))]
        return self._tokenize(pairs, locate_subjects=True)

    def _tokenize(self, pairs: Sequence[_Pair], locate_subjects: bool = False) -> TokenizedBatch:
        """Tokenize and pad rows; prompts get the tokenizer's default special tokens, targets none."""
        if not pairs:
            empty = torch.zeros((0, 0), dtype=torch.long)
            none = torch.zeros(0, dtype=torch.long)
            located = none if locate_subjects else None
            return TokenizedBatch(empty, empty, empty, empty.bool(), none, located, located)
        prompt_ids, target_ids = self._encode(pairs)
        for pair, prompt, target in zip(pairs, prompt_ids, target_ids, strict=True):
            problem = self._length_problem(pair, len(prompt), len(target))
            if problem is not None:
                raise DataError(f"record {pair.record_id!r}, field '{pair.field}': {problem}")

        input_ids, attention_mask = pad_right([p + t for p, t in zip(prompt_ids, target_ids, strict=True)],
                                              self.tokenizer.pad_token_id)
        labels = torch.full_like(input_ids, IGNORE_INDEX)
        for row, (prompt, target) in enumerate(zip(prompt_ids, target_ids, strict=True)):
            labels[row, len(prompt):len(prompt) + len(target)] = torch.tensor(target)
        target_mask = torch.zeros_like(labels, dtype=torch.bool)
        target_mask[:, :-1] = labels[:, 1:] != IGNORE_INDEX
        request_index = torch.tensor([p.request_index for p in pairs], dtype=torch.long)
        first, last = self._subject_span(pairs, prompt_ids) if locate_subjects else (None, None)
        return TokenizedBatch(input_ids, attention_mask, labels, target_mask, request_index, first, last)

    def _subject_span(self, pairs: Sequence[_Pair],
                      prompt_ids: Sequence[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """For each row, the first and last token positions of the first occurrence of its subject in its
        prompt, counted by tokenizing the prompt cut before and after the subject (as ROME does); -1, -1
        where the prompt has no subject."""
        first = torch.full((len(pairs),), -1, dtype=torch.long)
        last = torch.full((len(pairs),), -1, dtype=torch.long)
        rows = [row for row, pair in enumerate(pairs) if pair.subject and pair.subject in pair.prompt]
        if not rows:
            return first, last
        starts = [pairs[row].prompt.find(pairs[row].subject) for row in rows]
        before = self.tokenizer([pairs[row].prompt[:start].rstrip() for row, start in zip(rows, starts, strict=True)])
        through = self.tokenizer([pairs[row].prompt[:start + len(pairs[row].subject)]
                                  for row, start in zip(rows, starts, strict=True)])
        for row, head, upto in zip(rows, before["input_ids"], through["input_ids"], strict=True):
            end = min(len(upto), len(prompt_ids[row]))
            if end > len(head):
                first[row], last[row] = len(head), end - 1
        return first, last

    def _encode(self, pairs: Sequence[_Pair]) -> tuple[list[list[int]], list[list[int]]]:
        """Token ids of the prompts (with the tokenizer's default special tokens) and targets (none)."""
        prompt_ids = self.tokenizer([p.prompt for p in pairs])["input_ids"]
        target_ids = self.tokenizer([" " + p.target for p in pairs], add_special_tokens=False)["input_ids"]
        return prompt_ids, target_ids

    def _length_problem(self, pair: _Pair, prompt_length: int, target_length: int) -> str | None:
        """What makes a row unusable, or None."""
        if prompt_length == 0:
            return (f"prompt {pair.prompt!r} tokenizes to no tokens, "
                    "so nothing predicts the first target token")
        if target_length == 0:
            return f"target {pair.target!r} tokenizes to no tokens"
        if self.max_length is not None and prompt_length + target_length > self.max_length:
            return (f"prompt + target are {prompt_length + target_length} tokens, "
                    f"more than max_length={self.max_length}")
        return None
