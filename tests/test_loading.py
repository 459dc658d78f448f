"""Loading JSON/JSONL (and Hub ids, through the same path) into EditRecords, with errors that say where."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest

from rledit.data import loading
from rledit.data.loading import SkippedRecordWarning, load_records
from rledit.data.records import LocalityPair
from rledit.errors import ConfigError, DataError

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
needs_shared_data = pytest.mark.skipif(
    not SHARED_DATA.is_dir(), reason=f"real data folder {SHARED_DATA} is absent (the team's machine has it)")


def _flat(case_id: int, subject: str = "Toko Yasuda", **changes) -> dict:
    record = {"case_id": case_id, "prompt": f"{subject}, the", "target_new": "piano", "subject": subject,
              "ground_truth": "guitar", "rephrase_prompt": f"{subject} is incredible at",
              "locality_prompt": "John Lennon performs on the", "locality_ground_truth": "guitar"}
    return {**record, **changes}


def _zsre(**changes) -> dict:
    record = {"src": "When was WEFS established?", "alt": "1997", "answers": ["1987"],
              "rephrase": "When has WEFS been established?", "loc": "nq question: who wrote hamlet",
              "loc_ans": "Shakespeare"}
    return {**record, **changes}


def _write_array(path: Path, rows: list) -> Path:
    path.write_text(json.dumps(rows, indent=2))
    return path


def _write_lines(path: Path, rows: list) -> Path:
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    return path


def test_json_array_and_jsonl_load_the_same_records(tmp_path):
    rows = [_flat(1), _flat(2, "Miles Davis"), _flat(3, "Biure")]
    from_array = load_records(_write_array(tmp_path / "cf.json", rows))
    from_lines = load_records(_write_lines(tmp_path / "cf.jsonl", rows))
    assert from_array.records == from_lines.records
    assert [r.record_id for r in from_array.records] == ["1", "2", "3"]
    assert from_array.dialect == "counterfact_flat" and from_array.skipped == 0
    assert from_array.records[1].rephrase_prompts == ("Miles Davis is incredible at",)


def test_values_survive_fields_whose_type_varies_between_records(tmp_path):
    # "2001" must stay a string although another record's rephrase is a list (arrow cannot type that column)
    rows = [_zsre(rephrase="2001", alt="1997"), _zsre(rephrase=["When was it founded?", "true"])]
    loaded = load_records(_write_array(tmp_path / "zsre.json", rows))
    assert [r.rephrase_prompts for r in loaded.records] == [("2001",), ("When was it founded?", "true")]
    assert loaded.records[0].target_new == "1997"


def test_nested_counterfact_loads_from_jsonl(tmp_path):
    row = {"case_id": 0, "requested_rewrite": {"prompt": "The mother tongue of {} is",
                                               "subject": "Danielle Darrieux",
                                               "target_new": {"str": "English", "id": "Q1860"},
                                               "target_true": {"str": "French", "id": "Q150"}},
           "paraphrase_prompts": ["Danielle Darrieux spoke the language"],
           "neighborhood_prompts": ["The native language of Montesquieu is", "Michel Rocard speaks"]}
    loaded = load_records(_write_lines(tmp_path / "cf_memit.jsonl", [row, {**row, "case_id": 1}]))
    assert loaded.dialect == "counterfact_memit"
    record = loaded.records[1]
    assert (record.record_id, record.prompt, record.target_new, record.target_true) == (
        "1", "The mother tongue of Danielle Darrieux is", "English", "French")
    assert record.locality[1] == LocalityPair("Michel Rocard speaks", "French")


def test_records_without_ids_are_named_by_file_stem_and_index(tmp_path):
    loaded = load_records(_write_lines(tmp_path / "zsre_small.jsonl", [_zsre(), _zsre(alt="1999")]))
    assert [r.record_id for r in loaded.records] == ["zsre_small:0", "zsre_small:1"]


def test_limit_counts_returned_records(tmp_path):
    path = _write_array(tmp_path / "cf.json", [_flat(i, f"S{i}") for i in range(5)])
    assert [r.record_id for r in load_records(path, limit=2).records] == ["0", "1"]


def test_explicit_dialect_validates_every_record_against_it(tmp_path):
    path = _write_array(tmp_path / "cf.json", [_flat(1)])
    with pytest.raises(DataError, match=r"record 0, field 'src': missing field"):
        load_records(path, dialect="zsre_mend")


BAD_RECORDS = [
    # (second record of a zsRE file, field named in the error, problem)
    (_zsre(alt=None), "alt", "missing field"),
    ({k: v for k, v in _zsre().items() if k != "loc"}, "loc", "missing field"),
    (_zsre(alt="  "), "alt", "empty or whitespace-only"),
    (_zsre(src=""), "src", "empty or whitespace-only"),
    (_zsre(alt=1997), "alt", "expected a string, got int"),
    (_zsre(answers="1987"), "answers", "expected a list of strings, got str"),
    (_zsre(answers=[1987]), "answers[0]", "expected a string, got int"),
    (_zsre(rephrase=["ok", {"x": 1}]), "rephrase[1]", "expected a string, got dict"),
]


@pytest.mark.parametrize("writer", [_write_array, _write_lines], ids=["json", "jsonl"])
@pytest.mark.parametrize(("bad", "field", "problem"), BAD_RECORDS,
                         ids=[f"{c[1]}-{c[2][:16]}" for c in BAD_RECORDS])
def test_bad_record_in_file_names_file_index_and_field(tmp_path, writer, bad, field, problem):
    name = "zsre.json" if writer is _write_array else "zsre.jsonl"
    path = writer(tmp_path / name, [_zsre(), bad, _zsre()])
    with pytest.raises(DataError) as caught:
        load_records(path)
    assert (caught.value.source, caught.value.index, caught.value.field) == (str(path), 1, field)
    assert str(caught.value).startswith(f"file {path}, record 1, field '{field}': ")
    assert problem in str(caught.value)


def test_unknown_dialect_in_file_lists_known_dialects_and_fields(tmp_path):
    path = _write_lines(tmp_path / "qa.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(DataError) as caught:
        load_records(path)
    message = str(caught.value)
    assert message.startswith(f"file {path}, record 0: unknown dialect")
    assert "fields seen: answer, question" in message
    assert "counterfact_memit" in message and "zsre_mend" in message


def test_non_object_row_falls_back_to_json_and_names_the_record(tmp_path):
    # arrow cannot build a table from an object and a string; the json module locates the bad record
    path = tmp_path / "mixed.json"
    path.write_text(json.dumps([_zsre(), "not a record"]))
    with pytest.raises(DataError, match=rf"file {path}, record 1: expected a JSON object, got str"):
        load_records(path)


def test_duplicate_record_ids_name_both_indices(tmp_path):
    path = _write_array(tmp_path / "cf.json", [_flat(4), _flat(5, "Biure"), _flat(4, "Miles Davis")])
    with pytest.raises(DataError) as caught:
        load_records(path)
    assert str(caught.value) == (f"file {path}, record 2, field 'case_id': duplicate record id '4', "
                                 "also used by record 0")


def test_skip_mode_counts_and_warns_about_each_bad_record(tmp_path):
    rows = [_flat(1), _flat(2, target_new=""), _flat(3, "Biure"), _flat(1, "Miles Davis"),
            _flat(5, rephrase_prompt=7)]
    path = _write_array(tmp_path / "cf.json", rows)
    with pytest.warns(SkippedRecordWarning) as warned:
        loaded = load_records(path, on_bad_record="skip")
    assert [r.record_id for r in loaded.records] == ["1", "3"]
    assert loaded.skipped == 3
    messages = [str(w.message) for w in warned]
    assert [m.split(": ")[1] for m in messages] == [
        f"file {path}, record 1, field 'target_new'", f"file {path}, record 3, field 'case_id'",
        f"file {path}, record 4, field 'rephrase_prompt'"]


@pytest.mark.parametrize(("content", "problem"), [
    ('[{"src": "x",', "invalid JSON"),
    ("", "empty file"),
    ("[]", "no records"),
])
def test_unusable_json_file_names_the_file(tmp_path, content, problem):
    path = tmp_path / "broken.json"
    path.write_text(content)
    with pytest.raises(DataError, match=rf"^file {path}: {problem}"):
        load_records(path)


def test_invalid_jsonl_line_names_the_line_and_record(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps(_zsre()) + "\n\n" + '{"src": \n')
    with pytest.raises(DataError, match=rf"^file {path}, record 1: invalid JSON on line 3"):
        load_records(path)


def test_missing_and_unsupported_files(tmp_path):
    with pytest.raises(DataError, match=rf"^file {tmp_path / 'absent.jsonl'}: file not found"):
        load_records(tmp_path / "absent.jsonl")
    csv = tmp_path / "edits.csv"
    csv.write_text("src,alt\n")
    with pytest.raises(DataError, match=r"unsupported file type '.csv'"):
        load_records(csv)


def test_bad_options_are_refused(tmp_path):
    path = _write_array(tmp_path / "cf.json", [_flat(1)])
    with pytest.raises(ConfigError, match="on_bad_record"):
        load_records(path, on_bad_record="ignore")
    with pytest.raises(DataError, match="unknown dialect 'cf'"):
        load_records(path, dialect="cf")


def test_hub_id_goes_through_datasets_and_the_same_adaptation(monkeypatch):
    calls = []

    def fake_load_dataset(source, *, split):
        calls.append((source, split))
        return datasets.Dataset.from_list([_flat(1), _flat(2, "Biure", target_new=" ")])

    monkeypatch.setattr(loading.datasets, "load_dataset", fake_load_dataset)
    with pytest.raises(DataError, match=r"^file someone/counterfact, record 1, field 'target_new': empty"):
        load_records("someone/counterfact", split="validation")
    assert calls == [("someone/counterfact", "validation")]


def test_hub_failure_becomes_a_data_error(monkeypatch):
    def failing_load_dataset(source, *, split):
        raise FileNotFoundError(f"Dataset '{source}' doesn't exist on the Hub")

    monkeypatch.setattr(loading.datasets, "load_dataset", failing_load_dataset)
    with pytest.raises(DataError, match=r"^file nobody/nothing: cannot load dataset \(split 'train'\): Data"):
        load_records("nobody/nothing")


@needs_shared_data
@pytest.mark.shared_data
def test_counterfact_files_load_completely():
    train = load_records(SHARED_DATA / "counterfact" / "counterfact-train.json")
    val = load_records(SHARED_DATA / "counterfact" / "counterfact-val.json")
    assert (len(train.records), train.skipped, len(val.records), val.skipped) == (10_000, 0, 1_919, 0)
    assert train.dialect == val.dialect == "counterfact_flat"
    first = train.records[0]
    assert (first.record_id, first.prompt, first.target_new, first.target_true, first.subject) == (
        "2", "Toko Yasuda, the", "piano", "guitar", "Toko Yasuda")
    assert first.rephrase_prompts == ("Toko Yasuda is incredible at",)
    assert first.locality == (LocalityPair("John Lennon performs on the", "guitar"),)
    assert val.records[0].target_new == "Sega"
    assert not {r.record_id for r in train.records} & {r.record_id for r in val.records}


@needs_shared_data
@pytest.mark.shared_data
def test_zsre_file_has_two_empty_targets_that_are_refused_or_skipped():
    path = SHARED_DATA / "zsre" / "zsre_mend_train-1k.json"
    with pytest.raises(DataError, match=r"record 534, field 'alt': empty or whitespace-only"):
        load_records(path)
    with pytest.warns(SkippedRecordWarning):
        loaded = load_records(path, on_bad_record="skip")
    assert (len(loaded.records), loaded.skipped, loaded.dialect) == (998, 2, "zsre_mend")
    assert "zsre_mend_train-1k:534" not in {r.record_id for r in loaded.records}
    first = loaded.records[0]
    assert (first.prompt, first.target_new, first.target_true, first.subject) == (
        "What is the product made by UniFirst?", "unmanned aircraft", "uniform", "UniFirst")
    assert first.locality == (LocalityPair("nq question: john goodman's character in the big lebowski",
                                           "Walter Sobchak"),)
    # the file has targets with a stray leading space; they are stripped (tokenization adds exactly one)
    assert all(r.target_new == r.target_new.strip() for r in loaded.records)
