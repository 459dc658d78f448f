"""The one edit-record type every dialect is converted into."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from rledit.errors import DataError


@dataclass(frozen=True)
class LocalityPair:
    """A prompt unrelated to the edit and its true answer (the model should keep answering it)."""

    prompt: str
    answer: str


@dataclass(frozen=True)
class EditRecord:
    """One edit request.

    `target_new` is what the edited model should say after `prompt`; targets are stored without the
    leading space, which tokenization adds. `rephrase_prompts` should also yield `target_new`;
    `locality` pairs should keep their answers.
    """

    record_id: str
    prompt: str
    target_new: str
    target_true: str | None = None
    subject: str | None = None
    rephrase_prompts: tuple[str, ...] = ()
    locality: tuple[LocalityPair, ...] = field(default_factory=tuple)


def record_from_mapping(raw: Mapping[str, Any], index: int) -> EditRecord:
    """An EditRecord from a dict of its own field names (prompt, target_new, subject, target_true,
    rephrase_prompts, locality as (prompt, answer) pairs or {"prompt", "answer"} dicts, record_id), the
    form a Python caller writes; every problem is a DataError naming the request and the field."""
    if not isinstance(raw, Mapping):
        raise DataError(f"expected a dict or an EditRecord, got {type(raw).__name__}", index=index)
    unknown = sorted(set(raw) - {f.name for f in fields(EditRecord)})
    if unknown:
        raise DataError(f"unknown field(s) {', '.join(unknown)}; an edit request has "
                        f"{', '.join(f.name for f in fields(EditRecord))}", index=index, field=unknown[0])

    def text(name: str, required: bool) -> str | None:
        value = raw.get(name)
        if value is None and not required:
            return None
        if not isinstance(value, str) or not value.strip():
            raise DataError(f"expected a non-empty string, got {value!r}", index=index, field=name)
        return value

    def pair(value: Any) -> LocalityPair:
        if isinstance(value, Mapping) and set(value) == {"prompt", "answer"}:
            value = (value["prompt"], value["answer"])
        if not (isinstance(value, Sequence) and not isinstance(value, str) and len(value) == 2
                and all(isinstance(v, str) and v.strip() for v in value)):
            raise DataError(f"expected (prompt, answer) pairs of strings, got {value!r}", index=index,
                            field="locality")
        return LocalityPair(*value)

    rephrases = raw.get("rephrase_prompts", ())
    if isinstance(rephrases, str) or not all(isinstance(p, str) and p.strip() for p in rephrases):
        raise DataError(f"expected a list of non-empty strings, got {rephrases!r}", index=index,
                        field="rephrase_prompts")
    return EditRecord(record_id=str(raw.get("record_id", f"request-{index}")), prompt=text("prompt", True),
                      target_new=text("target_new", True), target_true=text("target_true", False),
                      subject=text("subject", False), rephrase_prompts=tuple(rephrases),
                      locality=tuple(pair(p) for p in raw.get("locality", ())))
