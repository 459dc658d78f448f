"""Adapters from the knowledge-editing data dialects found on disk and on the Hub into `EditRecord`.

Each dialect is a small function over a `_Fields` reader, which does all type checking and names the
file, record index and field of anything wrong, so adapters stay one readable line per field.
"""

from __future__ import annotations

import reprlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rledit.data.records import EditRecord, LocalityPair
from rledit.errors import DataError

_ID_FIELDS = ("case_id", "id")


def _shown(value: Any) -> str:
    """A value's type and (shortened) repr, for error messages; reprlib stays shallow, so a huge or deeply
    nested value cannot make the message itself fail or take long."""
    text = reprlib.repr(value)
    return f"{type(value).__name__} {text if len(text) <= 60 else text[:57] + '...'}"


class _Fields:
    """Typed, validating access to one raw record (or a nested object of it)."""

    def __init__(self, raw: Mapping[str, Any], *, source: str, index: int, prefix: str = ""):
        self.raw, self.source, self.index, self.prefix = raw, source, index, prefix

    def error(self, field: str, message: str) -> DataError:
        return DataError(message, source=self.source, index=self.index, field=self.prefix + field)

    def _required(self, field: str) -> Any:
        value = self.raw.get(field)
        if value is None:
            raise self.error(field, "missing field")
        return value

    def _checked_text(self, value: Any, field: str) -> str:
        if not isinstance(value, str):
            raise self.error(field, f"expected a string, got {_shown(value)}")
        if not value.strip():
            raise self.error(field, "empty or whitespace-only text")
        return value.strip()

    def text(self, field: str) -> str:
        """A required non-empty string, stripped (targets get their leading space at tokenization)."""
        return self._checked_text(self._required(field), field)

    def optional_text(self, field: str) -> str | None:
        return None if self.raw.get(field) is None else self.text(field)

    def text_list(self, field: str, *, allow_single: bool = False) -> tuple[str, ...]:
        """A required list of non-empty strings; with `allow_single`, a lone string is a list of one."""
        value = self._required(field)
        if allow_single and isinstance(value, str):
            return (self._checked_text(value, field),)
        if not isinstance(value, list):
            expected = "a string or a list of strings" if allow_single else "a list of strings"
            raise self.error(field, f"expected {expected}, got {_shown(value)}")
        return tuple(self._checked_text(item, f"{field}[{i}]") for i, item in enumerate(value))

    def first_text(self, field: str) -> str:
        """The first of a required non-empty list of strings (zsRE lists true answers, canonical first)."""
        texts = self.text_list(field)
        if not texts:
            raise self.error(field, "empty list")
        return texts[0]

    def nested(self, field: str) -> _Fields:
        value = self._required(field)
        if not isinstance(value, Mapping):
            raise self.error(field, f"expected an object, got {_shown(value)}")
        return _Fields(value, source=self.source, index=self.index, prefix=f"{self.prefix}{field}.")

    def locality(self, prompts_field: str, answers_field: str) -> tuple[LocalityPair, ...]:
        """Locality pairs from parallel fields; a single answer is shared by every prompt."""
        prompts = self.text_list(prompts_field, allow_single=True)
        answers = self.text_list(answers_field, allow_single=True)
        if len(answers) == 1:
            answers = answers * len(prompts)
        if len(answers) != len(prompts):
            raise self.error(answers_field, f"{len(answers)} answers for {len(prompts)} prompts")
        return tuple(LocalityPair(prompt, answer) for prompt, answer in zip(prompts, answers, strict=True))

    def record_id(self) -> str:
        """The record's own id (`case_id`, then `id`), else `<file stem>:<index>`."""
        field = id_field(self.raw)
        if field is None:
            return f"{Path(self.source).stem}:{self.index}"
        value = self.raw[field]
        if isinstance(value, bool) or not isinstance(value, int | str):
            raise self.error(field, f"expected an integer or string id, got {_shown(value)}")
        return self._checked_text(str(value), field)


def id_field(raw: Mapping[str, Any]) -> str | None:
    """Which field carries the record's own id, if any."""
    return next((field for field in _ID_FIELDS if raw.get(field) is not None), None)


def _zsre_mend(r: _Fields) -> EditRecord:
    return EditRecord(
        record_id=r.record_id(), prompt=r.text("src"), target_new=r.text("alt"),
        target_true=r.first_text("answers"), subject=r.optional_text("subject"),
        rephrase_prompts=r.text_list("rephrase", allow_single=True), locality=r.locality("loc", "loc_ans"),
    )


def _zsre_malmen(r: _Fields) -> EditRecord:
    return EditRecord(
        record_id=r.record_id(), prompt=r.text("src"), target_new=r.text("ans"),
        subject=r.optional_text("subject"), rephrase_prompts=r.text_list("rephrase", allow_single=True),
        locality=r.locality("loc", "loc_ans"),
    )


def _counterfact_memit(r: _Fields) -> EditRecord:
    rewrite = r.nested("requested_rewrite")
    template, subject = rewrite.text("prompt"), rewrite.text("subject")
    if "{}" not in template:
        raise rewrite.error("prompt", f"template has no '{{}}' for the subject: {template!r}")
    target_true = rewrite.nested("target_true").text("str")
    return EditRecord(
        record_id=r.record_id(), prompt=template.replace("{}", subject),
        target_new=rewrite.nested("target_new").text("str"), target_true=target_true, subject=subject,
        rephrase_prompts=r.text_list("paraphrase_prompts"),
        locality=tuple(LocalityPair(p, target_true) for p in r.text_list("neighborhood_prompts")),
    )


def _counterfact_flat(r: _Fields) -> EditRecord:
    return EditRecord(
        record_id=r.record_id(), prompt=r.text("prompt"), target_new=r.text("target_new"),
        target_true=r.text("ground_truth"), subject=r.text("subject"),
        rephrase_prompts=r.text_list("rephrase_prompt", allow_single=True),
        locality=r.locality("locality_prompt", "locality_ground_truth"),
    )


def _fever_malmen(r: _Fields) -> EditRecord:
    return EditRecord(
        record_id=r.record_id(), prompt=r.text("prompt"), target_new=r.text("alt"),
        rephrase_prompts=r.text_list("equiv_prompt", allow_single=True),
        locality=r.locality("unrel_prompt", "unrel_ans"),
    )


@dataclass(frozen=True)
class Dialect:
    """A dialect: the fields that identify it (`signature`), the fields it reads (`fields`, listed in error
    messages) and the adapter that turns one raw record into an EditRecord."""

    name: str
    signature: frozenset[str]
    fields: tuple[str, ...]
    adapt: Callable[[_Fields], EditRecord]


DIALECTS: dict[str, Dialect] = {d.name: d for d in (
    Dialect("zsre_mend", frozenset({"src", "alt"}),
            ("src", "alt", "answers", "rephrase", "loc", "loc_ans"), _zsre_mend),
    Dialect("zsre_malmen", frozenset({"src", "ans"}),
            ("src", "ans", "rephrase", "loc", "loc_ans"), _zsre_malmen),
    Dialect("counterfact_memit", frozenset({"requested_rewrite"}),
            ("requested_rewrite", "paraphrase_prompts", "neighborhood_prompts"), _counterfact_memit),
    Dialect("counterfact_flat", frozenset({"prompt", "target_new"}),
            ("prompt", "subject", "target_new", "ground_truth", "rephrase_prompt", "locality_prompt",
             "locality_ground_truth"), _counterfact_flat),
    Dialect("fever_malmen", frozenset({"prompt", "equiv_prompt"}),
            ("prompt", "equiv_prompt", "alt", "unrel_prompt", "unrel_ans"), _fever_malmen),
)}


def _known_dialects() -> str:
    return "; ".join(f"{d.name} ({', '.join(d.fields)})" for d in DIALECTS.values())


def _require_mapping(raw: Any, *, source: str | None, index: int | None) -> Mapping[str, Any]:
    if not isinstance(raw, Mapping):
        raise DataError(f"expected a JSON object, got {_shown(raw)}", source=source, index=index)
    return raw


def detect_dialect(raw: Any, *, source: str | None = None, index: int | None = None) -> str:
    """The one dialect whose identifying fields the record has (fields holding null count as absent)."""
    raw = _require_mapping(raw, source=source, index=index)
    seen = sorted(field for field, value in raw.items() if value is not None)
    matches = [d.name for d in DIALECTS.values() if d.signature <= set(seen)]
    if len(matches) == 1:
        return matches[0]
    problem = f"ambiguous dialect (matches {', '.join(matches)}); pass the dialect explicitly" if matches \
        else "unknown dialect"
    raise DataError(f"{problem}; fields seen: {', '.join(seen) or 'none'}; "
                    f"known dialects: {_known_dialects()}", source=source, index=index)


def adapt_record(raw: Any, dialect: str, *, source: str, index: int) -> EditRecord:
    """Validate one raw record against `dialect` and convert it; every problem is a DataError naming where."""
    if dialect not in DIALECTS:
        raise DataError(f"unknown dialect {dialect!r}; known dialects: {_known_dialects()}", source=source)
    raw = _require_mapping(raw, source=source, index=index)
    return DIALECTS[dialect].adapt(_Fields(raw, source=source, index=index))
