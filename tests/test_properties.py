"""Property-based checks (hypothesis): whatever a user feeds the dialect adapters, the record loader or the
layer-spec parser, the answer is a correct result or one of rledit's own errors, never a stray KeyError,
TypeError or RecursionError from deep inside."""

from __future__ import annotations

import functools
import itertools
import json
import operator
import string
import sys
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from transformers import LlamaConfig, LlamaForCausalLM

from rledit.data.dialects import DIALECTS, adapt_record, detect_dialect
from rledit.data.loading import SkippedRecordWarning, load_records
from rledit.data.records import EditRecord
from rledit.errors import DataError, LayerSpecError
from rledit.models.layers import expand_layer_spec, resolve_edit_modules

SOURCE = "/data/edits.json"
INDEX = 17
DEEP = sys.getrecursionlimit()  # nesting that recursive code cannot follow
LONG_INTEGER = "1" * (sys.get_int_max_str_digits() + 1)  # digits that int() and str() refuse to convert

# ---------------------------------------------------------------------------------------------- strategies

json_scalars = (st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True, allow_infinity=True)
                | st.text(max_size=10))
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12)

nonblank = st.text(max_size=10).filter(str.strip)
blank = st.text(alphabet=" \t\n\r\x0b\x0c\u00a0\u2003", max_size=4)
text_lists = st.lists(nonblank, max_size=3)
text_or_list = nonblank | text_lists
record_ids = st.integers() | nonblank

# Every field name some dialect reads, so that random dicts reach deep into the adapters.
KNOWN_FIELDS = sorted({field for dialect in DIALECTS.values() for field in dialect.fields}
                      | {"case_id", "id", "subject", "prompt", "target_new", "target_true", "str"})
field_biased_values = st.recursive(
    json_scalars | nonblank | text_lists,
    lambda inner: (st.lists(inner, max_size=3)
                   | st.dictionaries(st.sampled_from(KNOWN_FIELDS) | st.text(max_size=4), inner, max_size=6)),
    max_leaves=16)
field_biased_records = st.dictionaries(st.sampled_from(KNOWN_FIELDS), field_biased_values, max_size=8)


@st.composite
def locality(draw: st.DrawFn, prompts_field: str, answers_field: str) -> dict[str, Any]:
    """Parallel prompt/answer fields in any accepted shape: one answer for all prompts, or one each."""
    prompts = draw(text_or_list)
    count = 1 if isinstance(prompts, str) else len(prompts)
    answers = draw(nonblank | st.lists(nonblank, min_size=count, max_size=count))
    return {prompts_field: prompts, answers_field: answers}


def _record(required: dict[str, st.SearchStrategy], *more: st.SearchStrategy[dict],
            **optional: st.SearchStrategy) -> st.SearchStrategy[dict]:
    """Records with the `required` fields, any of the `optional` ones, and the fields `more` draws."""
    parts = st.tuples(st.fixed_dictionaries(required, optional=optional), *more)
    return parts.map(lambda dicts: functools.reduce(operator.or_, dicts))


targets = st.fixed_dictionaries({"str": nonblank}, optional={"id": json_values})
# A valid record of each dialect; `note` is a field no adapter reads, so any value there is fine.
VALID = {
    "zsre_mend": _record({"src": nonblank, "alt": nonblank, "rephrase": text_or_list,
                          "answers": st.lists(nonblank, min_size=1, max_size=3)},
                         locality("loc", "loc_ans"), subject=nonblank, note=json_values),
    "zsre_malmen": _record({"src": nonblank, "ans": nonblank, "rephrase": text_or_list},
                           locality("loc", "loc_ans"), subject=nonblank, id=record_ids),
    "counterfact_memit": _record({
        "requested_rewrite": st.fixed_dictionaries({
            "prompt": st.tuples(st.text(max_size=5), st.text(max_size=5)).map("{}".join), "subject": nonblank,
            "target_new": targets, "target_true": targets}),
        "paraphrase_prompts": text_lists, "neighborhood_prompts": text_lists}, case_id=record_ids),
    "counterfact_flat": _record({"prompt": nonblank, "target_new": nonblank, "subject": nonblank,
                                 "ground_truth": nonblank, "rephrase_prompt": text_or_list},
                                locality("locality_prompt", "locality_ground_truth"), case_id=record_ids),
    "fever_malmen": _record({"prompt": nonblank, "alt": nonblank, "equiv_prompt": text_or_list},
                            locality("unrel_prompt", "unrel_ans"), id=record_ids, note=json_values),
}
valid_records = st.sampled_from(sorted(VALID)).flatmap(lambda name: st.tuples(st.just(name), VALID[name]))

# Fields an adapter cannot do without (nested ones as paths), and pairs whose lengths are checked together.
REQUIRED = {name: {(field,) for field in dialect.fields} for name, dialect in DIALECTS.items()}
REQUIRED["counterfact_memit"] |= {("requested_rewrite", key)
                                  for key in ("prompt", "subject", "target_new", "target_true")}
REQUIRED["counterfact_memit"] |= {("requested_rewrite", key, "str") for key in ("target_new", "target_true")}
PARTNERS = {"loc": "loc_ans", "locality_prompt": "locality_ground_truth", "unrel_prompt": "unrel_ans"}


# ------------------------------------------------------------------------------------------------ helpers

def _texts(record: EditRecord) -> list[str | None]:
    pairs = [text for pair in record.locality for text in (pair.prompt, pair.answer)]
    return [record.record_id, record.prompt, record.target_new, record.target_true, record.subject,
            *record.rephrase_prompts, *pairs]


def assert_well_formed(record: EditRecord) -> None:
    """Every text of an adapted record is a non-empty, stripped string (optional ones may be None)."""
    assert isinstance(record, EditRecord)
    for required in (record.record_id, record.prompt, record.target_new):
        assert isinstance(required, str)
    for text in _texts(record):
        assert text is None or (isinstance(text, str) and text and text == text.strip()), text


def _strings_in(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, list):
        yield from itertools.chain.from_iterable(map(_strings_in, value))
    elif isinstance(value, dict):
        yield from itertools.chain.from_iterable(map(_strings_in, value.values()))


def _root(field: str) -> str:
    return field.split(".")[0].split("[")[0]


def _adapt_or_data_error(raw: Any, dialect: str) -> EditRecord | DataError:
    """The adapted record or the DataError raised; any other exception fails the test by propagating."""
    try:
        record = adapt_record(raw, dialect, source=SOURCE, index=INDEX)
    except DataError as error:
        assert (error.source, error.index) == (SOURCE, INDEX)
        return error
    assert_well_formed(record)
    return record


# ------------------------------------------------------------------------------------------- dialects

@settings(max_examples=100, deadline=None)
@given(raw=json_values | field_biased_records)
@example(raw=[[[]]]).via("not an object")
def test_detection_names_a_known_dialect_or_raises_data_error(raw: Any) -> None:
    try:
        dialect = detect_dialect(raw, source=SOURCE, index=INDEX)
    except DataError as error:
        assert (error.source, error.index) == (SOURCE, INDEX)
        return
    assert dialect in DIALECTS
    assert DIALECTS[dialect].signature <= {key for key, value in raw.items() if value is not None}


@settings(max_examples=100, deadline=None)
@given(raw=json_values | field_biased_records, dialect=st.sampled_from(sorted(DIALECTS)))
def test_arbitrary_values_adapt_or_raise_data_error_naming_a_read_field(raw: Any, dialect: str) -> None:
    outcome = _adapt_or_data_error(raw, dialect)
    if isinstance(outcome, DataError) and isinstance(raw, dict):
        readable = {*DIALECTS[dialect].fields, "case_id", "id", "subject"}
        assert outcome.field is not None and _root(outcome.field) in readable, outcome


@settings(max_examples=100, deadline=None)
@given(case=valid_records)
def test_valid_records_are_detected_and_adapt_to_their_own_stripped_texts(case: tuple[str, dict]) -> None:
    dialect, raw = case
    assert detect_dialect(raw) == dialect
    record = _adapt_or_data_error(raw, dialect)
    assert isinstance(record, EditRecord), record
    given_texts = {text.strip() for text in _strings_in(raw)}
    # the CounterFact MEMIT prompt is its template filled with the subject; the id may be a number or made up
    composed = {record.record_id, record.prompt} if dialect == "counterfact_memit" else {record.record_id}
    assert {text for text in _texts(record) if text is not None} - composed <= given_texts


def test_a_value_too_deep_for_repr_is_reported_as_a_data_error() -> None:
    # not an @example: hypothesis itself could not print it
    too_deep = functools.reduce(lambda inner, _: [inner], range(DEEP), [])
    with pytest.raises(DataError, match=r"field 'alt': expected a string, got list \[\[\[\["):
        adapt_record({"src": "q", "alt": too_deep}, "zsre_mend", source=SOURCE, index=INDEX)


@st.composite
def mutated_records(draw: st.DrawFn) -> tuple[str, dict, tuple[str, ...], str]:
    """A valid record with one field (possibly nested) dropped, nulled, blanked, or given another type."""
    dialect, raw = draw(valid_records)
    paths = [(key,) for key in raw]
    if dialect == "counterfact_memit":
        rewrite = raw["requested_rewrite"]
        paths += [("requested_rewrite", key) for key in rewrite]
        paths += [("requested_rewrite", key, "str") for key in ("target_new", "target_true")]
    path = draw(st.sampled_from(paths))
    kind = draw(st.sampled_from(["drop", "null", "blank", "scalar", "any"]))
    parent = raw
    for key in path[:-1]:
        parent = parent[key]
    if kind == "drop":
        del parent[path[-1]]
    else:
        parent[path[-1]] = draw({"null": st.none(), "blank": blank, "any": json_values,
                                 "scalar": st.booleans() | st.integers() | st.floats()}[kind])
    return dialect, raw, path, kind


@settings(max_examples=150, deadline=None)
@given(case=mutated_records())
def test_near_valid_records_adapt_or_name_the_mutated_field(case: tuple[str, dict, tuple[str, ...], str]
                                                            ) -> None:
    dialect, raw, path, kind = case
    if DIALECTS[dialect].signature <= {key for key, value in raw.items() if value is not None}:
        assert detect_dialect(raw) == dialect
    else:
        with pytest.raises(DataError, match="unknown dialect"):
            detect_dialect(raw)

    outcome = _adapt_or_data_error(raw, dialect)
    must_fail = path in REQUIRED[dialect] and kind != "any"
    if isinstance(outcome, EditRecord):
        assert not must_fail, f"{'.'.join(path)} {kind} was accepted: {outcome}"
        return
    mutated = ".".join(path)
    named = {mutated, PARTNERS.get(mutated)}
    assert outcome.field in named or outcome.field.startswith((f"{mutated}.", f"{mutated}[")), outcome


# -------------------------------------------------------------------------------------------- loading

@pytest.fixture(scope="module")
def private_datasets_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Keep the arrow caches of the many generated files out of the user's ~/.cache."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path_factory.mktemp("datasets_cache")))
        yield


def _load_or_data_error(tmp_path: Path, suffix: str, content: bytes, on_bad_record: str) -> None:
    """Load `content` from a fresh file: the records must be well formed (one warning per skipped record),
    or a DataError must name the file."""
    path = Path(tempfile.mkdtemp(dir=tmp_path)) / f"edits{suffix}"
    path.write_bytes(content)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", SkippedRecordWarning)
            loaded = load_records(path, on_bad_record=on_bad_record)
    except DataError as error:
        assert error.source == str(path), error
        return
    assert loaded.dialect in DIALECTS and loaded.source == str(path)
    for record in loaded.records:
        assert_well_formed(record)
    assert loaded.skipped == sum(issubclass(w.category, SkippedRecordWarning) for w in caught)
    assert on_bad_record == "skip" or loaded.skipped == 0


# Bytes that look enough like JSON objects to get past the first character into pyarrow's reader.
json_tokens = st.sampled_from([b"{", b"}", b"[", b"]", b":", b",", b"\n", b" ", b'"', b"\\", b"null",
                               b"1e999", b'"src"', b'"alt"', b'"a"'])
json_ish_bytes = st.tuples(st.sampled_from([b"{", b"[{", b" {"]),
                           st.lists(json_tokens | st.binary(max_size=3), max_size=30)).map(
    lambda parts: parts[0] + b"".join(parts[1]))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(content=st.binary(max_size=64) | json_ish_bytes, suffix=st.sampled_from([".json", ".jsonl"]))
@example(content=b" null\n{}", suffix=".jsonl").via("a null first row crashes pyarrow's JSON reader")
@example(content=b'[null, {"src": "a"}]', suffix=".json").via("datasets turns the array into the same lines")
@example(content=b"[" * DEEP + b"]" * DEEP, suffix=".json").via("too deep for the json module")
@example(content=f'[{{"case_id": {LONG_INTEGER}, "src": "a"}}, 3]'.encode(), suffix=".json").via(
    "an integer the json module cannot convert (and arrow will not read the mixed rows)")
@example(content=b'{"src": "a", "alt": "b"}\n' + b"[" * DEEP, suffix=".jsonl").via("a deep bad line")
@example(content=b'{"src": "a", "alt": ' + b"[" * 20 * DEEP + b"]" * 20 * DEEP + b"}", suffix=".jsonl").via(
    "deep enough to crash pyarrow's JSON reader (a segfault, not an exception)")
def test_random_bytes_load_or_raise_data_error(private_datasets_cache: None, tmp_path: Path, content: bytes,
                                                suffix: str) -> None:
    _load_or_data_error(tmp_path, suffix, content, "error")


json_rows = st.lists(valid_records.map(lambda case: case[1]) | mutated_records().map(lambda case: case[1])
                     | json_values, min_size=1, max_size=4)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=json_rows, as_lines=st.booleans(), on_bad_record=st.sampled_from(["error", "skip"]))
def test_json_documents_of_near_valid_rows_load_or_raise_data_error(
        private_datasets_cache: None, tmp_path: Path, rows: list[Any], as_lines: bool,
        on_bad_record: str) -> None:
    if as_lines:
        content, suffix = "\n".join(json.dumps(row) for row in rows), ".jsonl"
    else:
        content, suffix = json.dumps(rows), ".json"
    _load_or_data_error(tmp_path, suffix, content.encode(), on_bad_record)


# ---------------------------------------------------------------------------------------------- layer specs

@dataclass(frozen=True)
class Range:
    first: int
    last: int


@dataclass(frozen=True)
class Group:
    """A brace group; `padded` writes spaces around its alternatives (which the parser must ignore)."""

    alternatives: tuple[Range | tuple[str | Group, ...], ...]
    padded: bool = False


Pieces = tuple[str | Group, ...]


def render(pieces: Pieces) -> str:
    return "".join(piece if isinstance(piece, str) else _render_group(piece) for piece in pieces)


def _render_group(group: Group) -> str:
    pad = " " if group.padded else ""
    alternatives = (f"{a.first}-{a.last}" if isinstance(a, Range) else render(a) for a in group.alternatives)
    return "{" + ",".join(f"{pad}{text}{pad}" for text in alternatives) + "}"


def reference_names(pieces: Pieces) -> list[str]:
    """An independent expansion: each piece's options, multiplied out with the first piece varying slowest."""
    options = [[piece] if isinstance(piece, str) else [name for alternative in piece.alternatives
                                                       for name in _alternative_names(alternative)]
               for piece in pieces]
    return ["".join(choice) for choice in itertools.product(*options)]


def _alternative_names(alternative: Range | Pieces) -> list[str]:
    if isinstance(alternative, Range):
        return [str(i) for i in range(alternative.first, alternative.last + 1)]
    return reference_names(alternative)


literals = st.text(alphabet=string.ascii_letters + string.digits + "_.", min_size=1, max_size=5)
ranges = st.builds(lambda first, span: Range(first, first + span), st.integers(0, 12), st.integers(0, 3))


def _with_groups(sequences: st.SearchStrategy[Pieces]) -> st.SearchStrategy[Pieces]:
    groups = st.builds(Group, st.lists(ranges | sequences, min_size=1, max_size=3).map(tuple), st.booleans())
    return st.lists(literals | groups, min_size=1, max_size=3).map(tuple)


grammar_specs = st.recursive(st.lists(literals, min_size=1, max_size=2).map(tuple), _with_groups,
                             max_leaves=8)
spec_texts = st.text(alphabet=st.sampled_from("{},- .09ab") | st.characters(), max_size=30)


@settings(max_examples=200, deadline=None)
@given(pieces=grammar_specs)
def test_grammar_specs_expand_like_the_reference(pieces: Pieces) -> None:
    assert expand_layer_spec(render(pieces)) == list(dict.fromkeys(reference_names(pieces)))


@settings(max_examples=100, deadline=None)
@given(pieces=grammar_specs, corruption=st.sampled_from(["{", "}", "{}", "{a,}", "{9-2}", "{,1}"]),
       data=st.data())
def test_corrupted_grammar_specs_raise_layer_spec_error_naming_the_spec(pieces: Pieces, corruption: str,
                                                                       data: st.DataObject) -> None:
    text = render(pieces)
    at = data.draw(st.integers(0, len(text)), label="insert at")
    corrupted = text[:at] + corruption + text[at:]
    with pytest.raises(LayerSpecError, match="unbalanced|empty alternative|reversed range") as caught:
        expand_layer_spec(corrupted)
    assert repr(corrupted) in str(caught.value)


@settings(max_examples=200, deadline=None)
@given(text=spec_texts)
@example(text="{" * DEEP + "a" + "}" * DEEP).via("nested deeper than the interpreter's recursion limit")
@example(text="{a}" * DEEP).via("more groups in a row than the recursion limit")
@example(text="m.{0-999999999}").via("a range too large to build")
@example(text="{a,b}" * 30).via("a product too large to build")
@example(text=f"{{{LONG_INTEGER}-{LONG_INTEGER}}}").via("bounds too long for int()")
def test_arbitrary_text_expands_to_distinct_brace_free_names_or_raises(text: str) -> None:
    try:
        names = expand_layer_spec(text)
    except LayerSpecError as error:
        assert repr(text)[:40] in str(error)
        return
    assert names and len(set(names)) == len(names)
    assert not any("{" in name or "}" in name for name in names)
    if "{" not in text and "}" not in text:
        assert names == [text]


def test_only_ascii_digits_make_a_range() -> None:
    # Arabic-Indic "3-5" is a name, not the layers 3, 4 and 5
    assert expand_layer_spec("h.{\u0663-\u0665}") == ["h.\u0663-\u0665"]


LAYER = "<layer>"
# Paths through a Llama model, segment by segment: a name, a choice among names, or a layer index.
LLAMA_PATHS = (
    ("model", "layers", LAYER, "mlp", ("gate_proj", "up_proj", "down_proj", "act_fn")),
    ("model", "layers", LAYER, "self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
    ("model", "layers", LAYER, ("mlp", "self_attn", "input_layernorm", "post_attention_layernorm")),
    ("model", ("embed_tokens", "norm", "rotary_emb", "layers")),
    (("lm_head", "model"),),
)


layer_alternatives = st.builds(Range, st.integers(0, 2), st.integers(2, 3)) | st.integers(0, 3).map(
    lambda i: (str(i),))
layer_pieces = st.integers(0, 3).map(str) | st.builds(Group, st.lists(layer_alternatives, min_size=1,
                                                                      max_size=2).map(tuple))


@st.composite
def llama_specs(draw: st.DrawFn) -> Pieces:
    """A spec along a real Llama module path (which may still name a missing layer, a typo or a non-linear
    module)."""
    pieces: list[str | Group] = []
    for segment in draw(st.sampled_from(LLAMA_PATHS)):
        if pieces:
            pieces.append(".")
        if segment == LAYER:
            pieces.append(draw(layer_pieces))
        elif isinstance(segment, tuple):
            names = draw(st.lists(st.sampled_from(segment), min_size=1, max_size=3, unique=True))
            pieces.append(names[0] if len(names) == 1 else Group(tuple((name,) for name in names)))
        else:
            pieces.append(draw(st.sampled_from([segment, segment[:-1]])))  # sometimes a typo
    return tuple(pieces)


@functools.cache
def tiny_llama(num_layers: int, tie_embeddings: bool) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(num_hidden_layers=num_layers, tie_word_embeddings=tie_embeddings,
                                        hidden_size=8, intermediate_size=12, num_attention_heads=2,
                                        num_key_value_heads=1, vocab_size=16))


@settings(max_examples=100, deadline=None)
@given(num_layers=st.integers(1, 3), tie_embeddings=st.booleans(),
       specs=st.lists(llama_specs().map(lambda pieces: (render(pieces), reference_names(pieces)))
                      | spec_texts.map(lambda text: (text, None)),  # names only the parser knows
                      min_size=1, max_size=3),
       as_single_string=st.booleans())
def test_resolution_returns_exactly_the_named_linear_modules_or_raises(
        num_layers: int, tie_embeddings: bool, specs: list[tuple[str, list[str] | None]],
        as_single_string: bool) -> None:
    model = tiny_llama(num_layers, tie_embeddings)
    modules = dict(model.named_modules())
    texts = [text for text, _ in specs]
    try:
        found = resolve_edit_modules(model, texts[0] if as_single_string else texts)
    except LayerSpecError:
        found = None
    known = [names for _, names in (specs[:1] if as_single_string else specs)]
    if all(names is not None for names in known):
        wanted = {name for names in known for name in names}
        resolvable = all(isinstance(modules.get(name), torch.nn.Linear) for name in wanted)
        assert (found is not None) == resolvable, (texts, found)
        if found is not None:
            assert list(found) == [name for name in modules if name in wanted]
    for name, editable in (found or {}).items():
        assert editable.module is modules[name] and not editable.transposed
        assert editable.weight_view().shape == (editable.d_out, editable.d_in)
