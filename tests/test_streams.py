"""Edit streams: seeded, drawn without replacement, training and evaluation sharing no record or subject."""

from __future__ import annotations

import lightning
import pytest
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from test_collate import build_word_tokenizer

from rledit.data.collate import EditBatch, EditCollator
from rledit.data.records import EditRecord, LocalityPair
from rledit.data.streams import EditStream, EditStreamDataModule, split_records
from rledit.errors import ConfigError, DataError

RELATIONS = ("was born in", "works for", "speaks")


def _records(subjects: int = 12, without_subject: int = 6) -> list[EditRecord]:
    """`subjects` subjects with one record per relation, plus records that name no subject."""
    records = [EditRecord(f"s{s}-r{r}", f"person{s} {relation}", f"object{(s + r) % 5}",
                          target_true=f"object{s % 5}", subject=f"person{s}",
                          rephrase_prompts=(f"they say person{s} {relation}",),
                          locality=(LocalityPair(f"person{(s + 1) % subjects} {relation}", "object1"),))
               for s in range(subjects) for r, relation in enumerate(RELATIONS)]
    records += [EditRecord(f"anon{i}", f"someone{i} speaks", "object2") for i in range(without_subject)]
    return records


RECORDS = _records()
COLLATOR = EditCollator(build_word_tokenizer([t for r in _records(40) for t in (
    r.prompt, r.target_new, r.target_true or "", *r.rephrase_prompts, *(p.prompt for p in r.locality))]))


def _ids(records: list[EditRecord]) -> list[str]:
    return [r.record_id for r in records]


def test_split_is_exact_disjoint_by_id_and_subject_and_complete():
    train, held_out = split_records(RECORDS, eval_size=10, seed=0)
    assert len(held_out) == 10 and len(train) == len(RECORDS) - 10
    assert sorted(_ids(train) + _ids(held_out)) == sorted(_ids(RECORDS))
    assert not {r.subject for r in train if r.subject} & {r.subject for r in held_out if r.subject}
    # 10 is not a multiple of 3: the subject-less records fill the gap
    assert any(r.subject is None for r in held_out)


def test_split_is_seeded():
    first, again, other = (split_records(RECORDS, 9, seed) for seed in (3, 3, 4))
    assert first == again
    assert set(_ids(first[1])) != set(_ids(other[1]))


def test_split_refuses_a_size_it_cannot_hold_out_without_splitting_a_subject():
    with pytest.raises(ConfigError, match="cannot hold out exactly 4 records without splitting a subject"):
        split_records(_records(without_subject=0), eval_size=4, seed=0)
    with pytest.raises(ConfigError, match="eval_size must be between 0 and the 42 records, got 43"):
        split_records(RECORDS, eval_size=43, seed=0)


def test_split_refuses_duplicate_record_ids():
    with pytest.raises(DataError, match="input records 0 and 42 share the record id 's0-r0'"):
        split_records([*RECORDS, RECORDS[0]], eval_size=3, seed=0)


def test_stream_draws_distinct_requests_with_its_seed():
    stream = EditStream(RECORDS, num_steps=4, edits_per_step=5, seed=1)
    assert [len(step) for step in stream.steps] == [5, 5, 5, 5]
    drawn = [r.record_id for step in stream.steps for r in step]
    assert len(set(drawn)) == 20
    assert EditStream(RECORDS, 4, 5, seed=1).steps == stream.steps
    assert EditStream(RECORDS, 4, 5, seed=2).steps != stream.steps


def test_stream_needing_more_records_than_available_names_the_sizes():
    with pytest.raises(ConfigError, match="5 steps x 9 edits needs 45 distinct records, only 42 available"):
        EditStream(RECORDS, num_steps=5, edits_per_step=9, seed=0)


def _data_module(train: list[EditRecord], held_out: list[EditRecord], seed: int = 0) -> EditStreamDataModule:
    return EditStreamDataModule(train, held_out, COLLATOR, edits_per_step=3, train_num_steps=4,
                                eval_num_steps=2, sequences_per_epoch=3, seed=seed)


def _sequence_ids(sequence: list[EditBatch]) -> list[list[str]]:
    return [_ids(batch.records) for batch in sequence]


def _epoch(module: EditStreamDataModule, epoch: int) -> list[list[list[str]]]:
    module.sampler.set_epoch(epoch)
    return [_sequence_ids(sequence) for sequence in module.train_dataloader()]


def test_training_sequences_are_fresh_per_epoch_repeatable_and_from_training_records_only():
    train, held_out = split_records(RECORDS, eval_size=9, seed=0)
    module = _data_module(train, held_out)
    epoch0 = _epoch(module, 0)
    assert len(module.train_dataloader()) == len(epoch0) == 3
    for sequence in epoch0:
        assert [len(step) for step in sequence] == [3, 3, 3, 3]
        drawn = [record_id for step in sequence for record_id in step]
        assert len(set(drawn)) == len(drawn) and set(drawn) <= set(_ids(train))
    assert _epoch(module, 0) == epoch0 == _epoch(_data_module(train, held_out), 0)
    assert _epoch(module, 1) != epoch0
    assert _epoch(_data_module(train, held_out, seed=1), 0) != epoch0


def test_training_items_are_collated_edit_batches():
    train, held_out = split_records(RECORDS, eval_size=9, seed=0)
    sequence = next(iter(_data_module(train, held_out).train_dataloader()))
    assert all(isinstance(batch, EditBatch) for batch in sequence)
    assert sequence[0].edit.input_ids.shape[0] == 3
    moved = move_data_to_device(sequence, torch.device("cpu"))  # what Lightning does with each item
    assert [batch.records for batch in moved] == [batch.records for batch in sequence]


def test_evaluation_sequence_is_single_fixed_and_held_out():
    train, held_out = split_records(RECORDS, eval_size=9, seed=0)
    module = _data_module(train, held_out)
    first, again = list(module.val_dataloader()), list(module.val_dataloader())
    assert len(first) == 1 and [len(step) for step in _sequence_ids(first[0])] == [3, 3]
    assert _sequence_ids(first[0]) == _sequence_ids(again[0])
    assert {i for step in _sequence_ids(first[0]) for i in step} <= set(_ids(held_out))


def test_several_validation_sequences_are_distinct_orders_of_the_held_out_records_every_time():
    train, held_out = split_records(RECORDS, eval_size=9, seed=0)
    module = EditStreamDataModule(train, held_out, COLLATOR, edits_per_step=3, train_num_steps=4, eval_num_steps=2,
                                  sequences_per_epoch=3, seed=0, val_sequences=3)
    first = [_sequence_ids(s) for s in module.val_dataloader()]
    assert len(first) == 3 and first == [_sequence_ids(s) for s in module.val_dataloader()]
    assert len({str(s) for s in first}) == 3
    assert first[0] == _sequence_ids(next(iter(_data_module(train, held_out).val_dataloader())))
    assert all(i in _ids(held_out) for s in first for step in s for i in step)
    with pytest.raises(ConfigError, match="training.val_sequences=0"):
        EditStreamDataModule(train, held_out, COLLATOR, edits_per_step=3, train_num_steps=4, eval_num_steps=2,
                             sequences_per_epoch=3, seed=0, val_sequences=0)


def test_data_module_refuses_overlapping_or_too_small_record_sets():
    train, held_out = split_records(RECORDS, eval_size=9, seed=0)
    with pytest.raises(DataError, match=rf"record id '{held_out[2].record_id}' is both training record "
                                        r".* and evaluation record 2"):
        _data_module([*train, held_out[2]], held_out)
    with pytest.raises(ConfigError, match="evaluation stream of 2 steps x 3 edits needs 6 distinct records"):
        _data_module(train, held_out[:5])


class _RecordingModule(lightning.LightningModule):
    """Records which requests each training and validation item held."""

    def __init__(self):
        super().__init__()
        self.automatic_optimization = False
        self.seen: dict[str, list] = {"train": [], "val": []}

    def training_step(self, sequence: list[EditBatch], index: int) -> None:
        self.seen["train"].append((self.current_epoch, _sequence_ids(sequence)))

    def validation_step(self, sequence: list[EditBatch], index: int) -> None:
        self.seen["val"].append(_sequence_ids(sequence))

    def configure_optimizers(self) -> None:
        return None


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_lightning_trainer_gets_new_training_sequences_each_epoch_and_the_same_evaluation():
    train, held_out = split_records(RECORDS, eval_size=9, seed=0)
    module, data = _RecordingModule(), _data_module(train, held_out)
    trainer = lightning.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                                enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(module, datamodule=data)
    by_epoch = [[ids for epoch, ids in module.seen["train"] if epoch == e] for e in (0, 1)]
    expected = [[_sequence_ids(data.train_sequences[n]) for n in range(3 * e, 3 * e + 3)] for e in (0, 1)]
    assert by_epoch == expected
    assert len(module.seen["val"]) == 2 and module.seen["val"][0] == module.seen["val"][1]
