"""Seeded edit streams: a train/eval split with no shared record or subject, and sequences of edit batches.

A stream is `num_steps x edits_per_step` requests drawn without replacement. Training draws a fresh
sequence per item (sequence n of the run is a pure function of the seed and n, so epochs differ and
runs repeat); evaluation uses one fixed sequence drawn from the held-out records only.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator, Sequence

from lightning import LightningDataModule
from torch.utils.data import DataLoader, Dataset, Sampler

from rledit.data.collate import EditBatch, EditCollator
from rledit.data.records import EditRecord
from rledit.errors import ConfigError, DataError


def derive_seed(seed: int, tag: str) -> int:
    """An independent 64-bit seed for a named purpose (stable across processes, unlike hash())."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{tag}".encode()).digest()[:8], "little")


def _require_unique_ids(records: Sequence[EditRecord], role: str) -> None:
    first_index: dict[str, int] = {}
    for index, record in enumerate(records):
        if record.record_id in first_index:
            raise DataError(f"{role} records {first_index[record.record_id]} and {index} share the record id "
                            f"{record.record_id!r}")
        first_index[record.record_id] = index


def _require_disjoint(train: Sequence[EditRecord], held_out: Sequence[EditRecord]) -> None:
    _require_unique_ids(train, "training")
    _require_unique_ids(held_out, "evaluation")
    train_index = {record.record_id: index for index, record in enumerate(train)}
    for index, record in enumerate(held_out):
        if record.record_id in train_index:
            raise DataError(f"record id {record.record_id!r} is both training record "
                            f"{train_index[record.record_id]} and evaluation record {index}: "
                            "the streams must be disjoint")


def split_records(records: Sequence[EditRecord], eval_size: int,
                  seed: int) -> tuple[list[EditRecord], list[EditRecord]]:
    """Split into (train, eval) with exactly `eval_size` eval records, disjoint by record id and by subject.

    Records sharing a subject move together, so no subject is seen on both sides; records without a subject
    are grouped on their own.
    """
    if not 0 <= eval_size <= len(records):
        raise ConfigError(f"eval_size must be between 0 and the {len(records)} records, got {eval_size}")
    _require_unique_ids(records, "input")
    groups: dict[tuple[str, str], list[EditRecord]] = {}
    for record in records:
        key = ("subject", record.subject) if record.subject is not None else ("id", record.record_id)
        groups.setdefault(key, []).append(record)
    shuffled = list(groups.values())
    random.Random(seed).shuffle(shuffled)

    train: list[EditRecord] = []
    held_out: list[EditRecord] = []
    for group in shuffled:
        (held_out if len(held_out) + len(group) <= eval_size else train).extend(group)
    if len(held_out) < eval_size:
        raise ConfigError(f"cannot hold out exactly {eval_size} records without splitting a subject "
                          f"(reached {len(held_out)}); choose another eval_size or seed")
    return train, held_out


def _require_stream_size(available: int, num_steps: int, edits_per_step: int, role: str) -> None:
    if num_steps < 1 or edits_per_step < 1:
        raise ConfigError(f"{role} stream needs num_steps >= 1 and edits_per_step >= 1, "
                          f"got {num_steps} and {edits_per_step}")
    if num_steps * edits_per_step > available:
        raise ConfigError(f"{role} stream of {num_steps} steps x {edits_per_step} edits needs "
                          f"{num_steps * edits_per_step} distinct records, only {available} available")


class EditStream:
    """`num_steps` batches of `edits_per_step` distinct requests, drawn without replacement with `seed`."""

    def __init__(self, records: Sequence[EditRecord], num_steps: int, edits_per_step: int, seed: int,
                 role: str = "edit"):
        _require_stream_size(len(records), num_steps, edits_per_step, role)
        drawn = random.Random(seed).sample(range(len(records)), num_steps * edits_per_step)
        self.steps: list[list[EditRecord]] = [
            [records[i] for i in drawn[step * edits_per_step:(step + 1) * edits_per_step]]
            for step in range(num_steps)
        ]


class EditSequences(Dataset[list[EditBatch]]):
    """Item n: the collated steps of sequence n, an EditStream seeded by (seed, n)."""

    def __init__(self, records: Sequence[EditRecord], collator: EditCollator, num_steps: int,
                 edits_per_step: int, seed: int, role: str):
        _require_stream_size(len(records), num_steps, edits_per_step, role)
        self.records, self.collator, self.seed, self.role = records, collator, seed, role
        self.num_steps, self.edits_per_step = num_steps, edits_per_step

    def stream(self, sequence: int) -> EditStream:
        return EditStream(self.records, self.num_steps, self.edits_per_step,
                          seed=derive_seed(self.seed, f"{self.role}/{sequence}"), role=self.role)

    def __getitem__(self, sequence: int) -> list[EditBatch]:
        return [self.collator(step) for step in self.stream(sequence).steps]


class EpochSequenceSampler(Sampler[int]):
    """Yields the sequence numbers of the current epoch; Lightning calls `set_epoch` before each epoch."""

    def __init__(self, sequences_per_epoch: int):
        if sequences_per_epoch < 1:
            raise ConfigError(f"sequences_per_epoch must be >= 1, got {sequences_per_epoch}")
        self.sequences_per_epoch, self.epoch = sequences_per_epoch, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        first = self.epoch * self.sequences_per_epoch
        return iter(range(first, first + self.sequences_per_epoch))

    def __len__(self) -> int:
        return self.sequences_per_epoch


class ResumableLoader(DataLoader):
    """A DataLoader that Lightning checkpoints mid-epoch, so a resumed run trains on exactly the stream an
    uninterrupted one would.

    Lightning stores `state_dict()` (the epoch and how many of its items were handed out) in every checkpoint
    and gives it back through `load_state_dict` on resume; the resumed epoch then skips the items already
    trained on. Iteration starts lazily, at the first item, because Lightning creates the resumed epoch's
    iterator before it calls the sampler's `set_epoch`: an eager sampler would replay epoch 0.
    """

    position: tuple[int, int] = (0, 0)
    """(epoch, items handed out) of the current iteration."""
    resume_at: tuple[int, int] | None = None

    def state_dict(self) -> dict[str, int]:
        epoch, handed_out = self.position
        return {"epoch": epoch, "handed_out": handed_out}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.resume_at = (state["epoch"], state["handed_out"])

    def __iter__(self) -> Iterator[list[EditBatch]]:
        epoch = getattr(self.sampler, "epoch", 0)
        resume_epoch, handed_out = self.resume_at or (epoch, 0)
        skip = handed_out if resume_epoch == epoch else 0
        self.resume_at, self.position = None, (epoch, skip)
        items = super().__iter__()
        for _ in range(skip):  # an item is a pure function of its sequence number: fetching it is harmless
            next(items)
        for position, item in enumerate(items, start=skip + 1):
            self.position = (epoch, position)
            yield item


class EditStreamDataModule(LightningDataModule):
    """Training sequences of edit batches and the fixed held-out evaluation sequences.

    Each training item is a list of `train_num_steps` EditBatch (one training sequence, no request
    repeated inside it); the validation loader yields `val_sequences` such lists of `eval_num_steps`
    EditBatch, the same ones every time, drawn from `eval_records` only. One long sequence's result is one
    draw among many (its rounding alone moves it), so choosing between editors wants several.
    """

    def __init__(self, train_records: Sequence[EditRecord], eval_records: Sequence[EditRecord],
                 collator: EditCollator, edits_per_step: int, train_num_steps: int, eval_num_steps: int,
                 sequences_per_epoch: int, seed: int, val_sequences: int = 1):
        super().__init__()
        if val_sequences < 1:
            raise ConfigError(f"training.val_sequences={val_sequences}: need at least one validation sequence")
        self.val_sequences = val_sequences
        _require_disjoint(train_records, eval_records)
        self.train_sequences = EditSequences(train_records, collator, train_num_steps, edits_per_step, seed,
                                             role="training")
        self.eval_sequences = EditSequences(eval_records, collator, eval_num_steps, edits_per_step, seed,
                                            role="evaluation")
        self.sampler = EpochSequenceSampler(sequences_per_epoch)

    def train_dataloader(self) -> ResumableLoader:
        return ResumableLoader(self.train_sequences, batch_size=None, sampler=self.sampler, num_workers=0)

    def val_dataloader(self) -> DataLoader[list[EditBatch]]:
        return DataLoader(self.eval_sequences, batch_size=None, sampler=range(self.val_sequences), num_workers=0)
