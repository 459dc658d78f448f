"""Dialect adapters: each dialect's fields land in the right EditRecord slots; errors say where."""

from __future__ import annotations

import copy

import pytest

from rledit.data.dialects import DIALECTS, adapt_record, detect_dialect
from rledit.data.records import EditRecord, LocalityPair
from rledit.errors import DataError

SOURCE = "/data/edits.json"

ZSRE_MEND = {"subject": "UniFirst", "src": "What is the product made by UniFirst?", "pred": "uniform",
             "rephrase": "What will be the product of UniFirst?", "alt": " unmanned aircraft",
             "answers": ["uniform", "uniforms"], "loc": "nq question: who plays the cat in the hat movie",
             "loc_ans": "Mike Myers", "cond": "uniform >> unmanned aircraft || ..."}
ZSRE_MALMEN = {"src": "Which river does the Brunswick Bridge cross?", "ans": "Danube",
               "rephrase": ["What river is crossed by the Brunswick Bridge?",
                            "The Brunswick Bridge spans which river?"],
               "loc": "nq question: where is the world cup being held", "loc_ans": "Russia"}
COUNTERFACT_MEMIT = {
    "case_id": 7,
    "requested_rewrite": {"prompt": "{}, which is located in", "subject": "Autonomous University of Madrid",
                          "target_new": {"str": "Sweden", "id": "Q34"},
                          "target_true": {"str": "Spain", "id": "Q29"}},
    "paraphrase_prompts": ["Autonomous University of Madrid is located in", "Where is it? It is in"],
    "neighborhood_prompts": ["Biure, which is located in", "Madrid Arena is in"],
    "generation_prompts": ["Autonomous University of Madrid's surroundings include"],
}
COUNTERFACT_FLAT = {"case_id": 2, "prompt": "Toko Yasuda, the", "target_new": "piano",
                    "subject": "Toko Yasuda", "ground_truth": "guitar",
                    "rephrase_prompt": "Toko Yasuda is incredible at",
                    "locality_prompt": "John Lennon performs on the", "locality_ground_truth": "guitar"}
FEVER_MALMEN = {"id": "f-11", "prompt": "Nikolaj Coster-Waldau worked with the Fox Broadcasting Company.",
                "equiv_prompt": "Nikolaj Coster-Waldau collaborated with Fox.", "alt": "REFUTES",
                "unrel_prompt": "Roman Atwood is a content creator.", "unrel_ans": "SUPPORTS"}

RAW = {"zsre_mend": ZSRE_MEND, "zsre_malmen": ZSRE_MALMEN, "counterfact_memit": COUNTERFACT_MEMIT,
       "counterfact_flat": COUNTERFACT_FLAT, "fever_malmen": FEVER_MALMEN}

EXPECTED = {
    "zsre_mend": EditRecord(
        record_id="edits:3", prompt="What is the product made by UniFirst?", target_new="unmanned aircraft",
        target_true="uniform", subject="UniFirst",
        rephrase_prompts=("What will be the product of UniFirst?",),
        locality=(LocalityPair("nq question: who plays the cat in the hat movie", "Mike Myers"),)),
    "zsre_malmen": EditRecord(
        record_id="edits:3", prompt="Which river does the Brunswick Bridge cross?", target_new="Danube",
        rephrase_prompts=("What river is crossed by the Brunswick Bridge?",
                          "The Brunswick Bridge spans which river?"),
        locality=(LocalityPair("nq question: where is the world cup being held", "Russia"),)),
    "counterfact_memit": EditRecord(
        record_id="7", prompt="Autonomous University of Madrid, which is located in", target_new="Sweden",
        target_true="Spain", subject="Autonomous University of Madrid",
        rephrase_prompts=("Autonomous University of Madrid is located in", "Where is it? It is in"),
        locality=(LocalityPair("Biure, which is located in", "Spain"),
                  LocalityPair("Madrid Arena is in", "Spain"))),
    "counterfact_flat": EditRecord(
        record_id="2", prompt="Toko Yasuda, the", target_new="piano", target_true="guitar",
        subject="Toko Yasuda",
        rephrase_prompts=("Toko Yasuda is incredible at",),
        locality=(LocalityPair("John Lennon performs on the", "guitar"),)),
    "fever_malmen": EditRecord(
        record_id="f-11", prompt="Nikolaj Coster-Waldau worked with the Fox Broadcasting Company.",
        target_new="REFUTES", rephrase_prompts=("Nikolaj Coster-Waldau collaborated with Fox.",),
        locality=(LocalityPair("Roman Atwood is a content creator.", "SUPPORTS"),)),
}


def test_registry_covers_every_design_dialect():
    assert set(DIALECTS) == set(RAW)


@pytest.mark.parametrize("dialect", sorted(RAW))
def test_each_dialect_adapts_to_the_expected_record(dialect):
    assert detect_dialect(RAW[dialect]) == dialect
    assert adapt_record(RAW[dialect], dialect, source=SOURCE, index=3) == EXPECTED[dialect]


def test_zsre_mend_accepts_a_list_of_rephrases():
    raw = dict(ZSRE_MEND, rephrase=["first?", " second? "])
    assert adapt_record(raw, "zsre_mend", source=SOURCE, index=0).rephrase_prompts == ("first?", "second?")


def test_single_answer_is_shared_by_a_list_of_locality_prompts():
    raw = dict(COUNTERFACT_FLAT, locality_prompt=["A plays the", "B plays the"])
    record = adapt_record(raw, "counterfact_flat", source=SOURCE, index=0)
    assert record.locality == (LocalityPair("A plays the", "guitar"), LocalityPair("B plays the", "guitar"))


def test_detect_unknown_dialect_lists_known_dialects_and_fields_seen():
    with pytest.raises(DataError) as caught:
        detect_dialect({"question": "q", "answer": "a", "empty": None}, source=SOURCE, index=0)
    message = str(caught.value)
    assert "unknown dialect" in message and "fields seen: answer, question;" in message
    assert all(name in message for name in DIALECTS)
    assert f"file {SOURCE}, record 0" in message


def test_detect_ambiguous_dialect_asks_for_an_explicit_one():
    with pytest.raises(DataError, match=r"ambiguous dialect .*zsre_mend, zsre_malmen"):
        detect_dialect(dict(ZSRE_MEND, ans="x"))


def test_unknown_dialect_name_is_refused():
    with pytest.raises(DataError, match=r"unknown dialect 'zsre'.*known dialects: zsre_mend"):
        adapt_record(ZSRE_MEND, "zsre", source=SOURCE, index=0)


def _mutated(raw: dict, path: tuple[str, ...], value) -> dict:
    """A deep copy of `raw` with the field at `path` set to `value` (or removed when value is `...`)."""
    mutated = copy.deepcopy(raw)
    parent = mutated
    for key in path[:-1]:
        parent = parent[key]
    if value is ...:
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    return mutated


BAD_CASES = [
    # (dialect, path to the field, bad value or ... to remove it, field named in the error, message)
    ("zsre_mend", ("alt",), ..., "alt", "missing field"),
    ("zsre_mend", ("alt",), "   ", "alt", "empty or whitespace-only"),
    ("zsre_mend", ("src",), "", "src", "empty or whitespace-only"),
    ("zsre_mend", ("alt",), 1997, "alt", "expected a string, got int"),
    ("zsre_mend", ("answers",), "uniform", "answers", "expected a list of strings, got str"),
    ("zsre_mend", ("answers",), [], "answers", "empty list"),
    ("zsre_mend", ("answers",), ["ok", 3], "answers[1]", "expected a string, got int"),
    ("zsre_mend", ("rephrase",), {"text": "x"}, "rephrase", "expected a string or a list of strings"),
    ("zsre_mend", ("loc_ans",), None, "loc_ans", "missing field"),
    ("zsre_mend", ("subject",), 5, "subject", "expected a string"),
    ("zsre_malmen", ("ans",), ..., "ans", "missing field"),
    ("zsre_malmen", ("loc_ans",), ["a", "b", "c"], "loc_ans", "3 answers for 1 prompts"),
    ("counterfact_memit", ("requested_rewrite", "target_new", "str"), " ", "requested_rewrite.target_new.str",
     "empty or whitespace-only"),
    ("counterfact_memit", ("requested_rewrite", "target_true"), "Spain", "requested_rewrite.target_true",
     "expected an object, got str"),
    ("counterfact_memit", ("requested_rewrite", "prompt"), "Located in", "requested_rewrite.prompt",
     "template has no '{}'"),
    ("counterfact_memit", ("neighborhood_prompts",), "Biure is in", "neighborhood_prompts",
     "expected a list of strings, got str"),
    ("counterfact_memit", ("case_id",), 1.5, "case_id", "expected an integer or string id"),
    ("counterfact_flat", ("ground_truth",), ..., "ground_truth", "missing field"),
    ("counterfact_flat", ("target_new",), ["piano"], "target_new", "expected a string, got list"),
    ("counterfact_flat", ("subject",), "\t", "subject", "empty or whitespace-only"),
    ("fever_malmen", ("unrel_prompt",), 0, "unrel_prompt", "expected a string or a list of strings, got int"),
    ("fever_malmen", ("alt",), True, "alt", "expected a string, got bool"),
]


@pytest.mark.parametrize(("dialect", "path", "value", "field", "problem"), BAD_CASES,
                         ids=[f"{c[0]}-{c[3]}-{c[4][:20]}" for c in BAD_CASES])
def test_bad_record_names_file_index_and_field(dialect, path, value, field, problem):
    with pytest.raises(DataError) as caught:
        adapt_record(_mutated(RAW[dialect], path, value), dialect, source=SOURCE, index=41)
    error = caught.value
    assert (error.source, error.index, error.field) == (SOURCE, 41, field)
    assert str(error).startswith(f"file {SOURCE}, record 41, field '{field}': ")
    assert problem in str(error)


def test_record_that_is_not_an_object_is_refused():
    with pytest.raises(DataError, match=r"record 5: expected a JSON object, got list"):
        adapt_record(["src", "alt"], "zsre_mend", source=SOURCE, index=5)
