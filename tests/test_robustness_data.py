"""Bad data is caught when it is loaded, before any edit: rows longer than the model's context, unreadable
files.

(Missing, mistyped and empty fields, duplicate ids and malformed JSON are covered by test_loading.py and the
property-based tests of test_properties.py.)
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import LlamaConfig, LlamaForCausalLM

from rledit.data.collate import EditCollator
from rledit.data.loading import SkippedRecordWarning, load_records
from rledit.data.records import EditRecord
from rledit.data.sources import synthetic_records
from rledit.errors import ConfigError, DataError
from rledit.pipeline import build_experiment, row_length_limit
from tests.test_collate import build_word_tokenizer
from tests.test_evaluate_cli import compose_config, run_in_process

WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]
COLLATOR = EditCollator(build_word_tokenizer(WORDS), max_length=8)  # [BOS] + prompt + target <= 8 tokens


def _flat(case_id: int, prompt: str = "alpha beta", **changes) -> dict:
    """A CounterFact (flattened) record whose rows are all short."""
    return {"case_id": case_id, "prompt": prompt, "target_new": "gamma", "ground_truth": "delta",
            "subject": "alpha", "rephrase_prompt": "beta alpha", "locality_prompt": "zeta eta",
            "locality_ground_truth": "theta", **changes}


TOO_LONG = " ".join(WORDS)  # 8 words: [BOS] + 8 + target > 8


@pytest.mark.parametrize(("changes", "field", "tokens"), [
    ({"prompt": TOO_LONG}, "prompt", 10),
    ({"rephrase_prompt": TOO_LONG}, "rephrase_prompts[0]", 10),
    ({"locality_prompt": TOO_LONG}, "locality[0]", 10),
    ({"ground_truth": "delta " * 6}, "target_true", 9),
])
def test_a_too_long_row_is_refused_at_load_naming_file_record_and_field(tmp_path, changes, field, tokens):
    path = tmp_path / "cf.json"
    path.write_text(json.dumps([_flat(1), _flat(2, **changes), _flat(3)]))
    with pytest.raises(DataError) as caught:
        load_records(path, check=COLLATOR.row_problems)
    assert (caught.value.source, caught.value.index, caught.value.field) == (str(path), 1, field)
    assert str(caught.value).startswith(f"file {path}, record 1, field '{field}': prompt + target are "
                                        f"{tokens} tokens, more than max_length=8 (record id '2')")


def test_rows_longer_than_the_context_are_skipped_with_a_warning_and_counted(tmp_path):
    path = tmp_path / "cf.jsonl"
    rows = [_flat(1), _flat(2, prompt=TOO_LONG), _flat(3), _flat(4, locality_prompt=TOO_LONG)]
    path.write_text("\n".join(json.dumps(row) for row in rows))
    with pytest.warns(SkippedRecordWarning) as warned:
        loaded = load_records(path, on_bad_record="skip", check=COLLATOR.row_problems)
    assert [str(w.message).split(": ")[1] for w in warned] == [
        f"file {path}, record 1, field 'prompt'", f"file {path}, record 3, field 'locality[0]'"]
    assert [r.record_id for r in loaded.records] == ["1", "3"] and loaded.skipped == 2
    COLLATOR(loaded.records)  # what is left collates


def test_the_row_limit_is_the_models_context_unless_a_shorter_one_is_configured():
    config = LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(config)
    assert row_length_limit(None, model) == 64
    assert row_length_limit(32, model) == 32
    with pytest.raises(ConfigError, match=r"model.max_length=128 is longer than the model's context "
                                          r"\(max_position_embeddings=64\)"):
        row_length_limit(128, model)


def test_a_synthetic_world_too_long_for_max_length_fails_when_the_experiment_is_built(
        small_world):
    with pytest.raises(DataError, match=r"^file synthetic world, record 0, field 'prompt': prompt \+ target "
                                        r"are \d+ tokens, more than max_length=3"):
        build_experiment(compose_config([*small_world, "model.max_length=3"]))


def _records_file(path: Path, records: list[EditRecord], too_long_at: int) -> Path:
    """The records in the CounterFact (flattened) dialect, the prompt at `too_long_at` said ten times."""
    rows = [{"case_id": r.record_id, "prompt": r.prompt, "target_new": r.target_new,
             "ground_truth": r.target_true, "subject": r.subject, "rephrase_prompt": list(r.rephrase_prompts),
             "locality_prompt": r.locality[0].prompt, "locality_ground_truth": r.locality[0].answer}
            for r in records]
    rows[too_long_at]["prompt"] = " ".join([rows[too_long_at]["prompt"]] * 10)
    path.write_text(json.dumps(rows))
    return path


def test_evaluate_skips_and_counts_a_too_long_record_or_refuses_it_before_editing(
        small_world, small_edit_requests, tmp_path):
    train = _records_file(tmp_path / "train.json", small_edit_requests[:4], too_long_at=0)
    evaluation = _records_file(tmp_path / "eval.json", small_edit_requests[4:20], too_long_at=5)
    data = ["data=counterfact", f"data.records.train={train}", f"data.records.eval={evaluation}"]

    with pytest.warns(SkippedRecordWarning):
        document = run_in_process([*small_world, *data, "data.records.on_bad_record=skip",
                                   f"run_dir={tmp_path / 'skip'}"])
    assert document["skipped_records"] == 2
    assert json.loads((tmp_path / "skip" / "results.json").read_text())["skipped_records"] == 2

    with pytest.raises(DataError, match=rf"^file {train}, record 0, field 'prompt': prompt \+ target are "
                                        r"\d+ tokens, more than max_length=32"):
        run_in_process([*small_world, *data, f"run_dir={tmp_path / 'error'}"])
    assert not (tmp_path / "error" / "results.json").exists()


def test_an_unreadable_file_is_a_data_error_naming_it(tmp_path, monkeypatch):
    binary = tmp_path / "binary.json"
    binary.write_bytes(b"\xff\xfe\x00[{")
    with pytest.raises(DataError, match=rf"^file {binary}: cannot read: 'utf-8' codec can't decode"):
        load_records(binary)

    locked = tmp_path / "locked.jsonl"
    locked.write_text(json.dumps(_flat(1)))
    real_read_bytes, real_read_text = Path.read_bytes, Path.read_text

    def denied(read):
        def read_or_deny(self, *args, **kwargs):
            if self == locked:
                raise PermissionError(13, "Permission denied", str(self))
            return read(self, *args, **kwargs)
        return read_or_deny

    # tests run as root here, which chmod cannot lock out, so the operating system's refusal is simulated
    monkeypatch.setattr(Path, "read_bytes", denied(real_read_bytes))
    monkeypatch.setattr(Path, "read_text", denied(real_read_text))
    with pytest.raises(DataError, match=rf"^file {locked}: cannot read: \[Errno 13\] Permission denied"):
        load_records(locked)


def test_synthetic_data_on_another_model_says_which_model_and_data_fit():
    tokenizer = build_word_tokenizer(["a b c"])
    with pytest.raises(ConfigError, match="data=synthetic edits the synthetic world's own model: use model=tiny"):
        synthetic_records(object(), EditCollator(tokenizer))
