"""Load edit records from a local JSON/JSONL file or a Hub dataset, one dialect per source."""

from __future__ import annotations

import itertools
import json
import re
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import datasets

from rledit.data.dialects import DIALECTS, adapt_record, detect_dialect, id_field
from rledit.data.records import EditRecord
from rledit.errors import ConfigError, DataError

JSON_SUFFIXES = (".json", ".jsonl")
# Edit records are objects nested a few levels deep; see _arrow_can_read for why that is checked up front.
MAX_ARROW_NESTING = 64
_FIRST_ROW_IS_OBJECT = re.compile(rb"(?:\xef\xbb\xbf)?\s*(?:\[\s*)?\{")
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKETS = bytes(sorted(set(range(256)) - set(b"[]{}")))


RecordsCheck = Callable[[Sequence[EditRecord]], list[tuple[str, str] | None]]
"""Says of each record what makes it unusable, as (field, problem), or None (EditCollator.row_problems)."""
CHECK_CHUNK = 1024  # rows adapted and checked together: checks such as tokenization are much faster batched


class SkippedRecordWarning(UserWarning):
    """A bad record was left out because loading ran with on_bad_record="skip"."""


@dataclass(frozen=True)
class LoadedRecords:
    """The records of one source, the dialect they were read as, and how many bad records were skipped."""

    records: list[EditRecord]
    skipped: int
    dialect: str
    source: str


def load_records(source: str | Path, *, split: str = "train", dialect: str = "auto", limit: int | None = None,
                 on_bad_record: Literal["error", "skip"] = "error",
                 check: RecordsCheck | None = None) -> LoadedRecords:
    """Load up to `limit` edit records from a .json/.jsonl file, else a Hub dataset id (or dataset folder).

    The dialect is detected once from the first record (unless given) and every record is validated against
    it, then given to `check` (for example the collator's, which refuses prompts longer than the model's
    context). A bad record (or a duplicate record id) raises a DataError, or with on_bad_record="skip" is
    left out with a SkippedRecordWarning naming it.
    """
    if on_bad_record not in ("error", "skip"):
        raise ConfigError(f"on_bad_record must be 'error' or 'skip', got {on_bad_record!r}")
    if limit is not None and limit < 0:
        raise ConfigError(f"limit must be >= 0 or None, got {limit}")
    name, rows = _read_rows(source, split)
    if not rows:
        raise DataError("no records", source=name)
    dialect = _resolve_dialect(dialect, rows[0], name)

    records: list[EditRecord] = []
    first_index_of_id: dict[str, int] = {}
    skipped = 0
    for index, outcome in _adapted_and_checked(rows, dialect, name, check):
        if limit is not None and len(records) >= limit:
            break
        try:
            if isinstance(outcome, DataError):
                raise outcome
            if outcome.record_id in first_index_of_id:
                raise DataError(f"duplicate record id {outcome.record_id!r}, also used by record "
                                f"{first_index_of_id[outcome.record_id]}", source=name, index=index,
                                field=id_field(rows[index]))
        except DataError as error:
            if on_bad_record == "error":
                raise
            warnings.warn(f"skipping bad record: {error}", SkippedRecordWarning, stacklevel=2)
            skipped += 1
            continue
        first_index_of_id[outcome.record_id] = index
        records.append(outcome)
    return LoadedRecords(records=records, skipped=skipped, dialect=dialect, source=name)


def check_records(records: Sequence[EditRecord], check: RecordsCheck, source: str) -> None:
    """Raise a DataError naming `source`, the record and the field of the first record `check` refuses."""
    for index, (record, problem) in enumerate(zip(records, check(records), strict=True)):
        if problem is not None:
            raise _refusal(record, problem, source, index)


def _adapted_and_checked(rows: Sequence[Any], dialect: str, source: str,
                         check: RecordsCheck | None) -> Iterator[tuple[int, EditRecord | DataError]]:
    """(index, the row as an EditRecord or the DataError that says why it is unusable), CHECK_CHUNK rows at
    a time: no more rows are adapted and checked than the caller reads."""
    for start in range(0, len(rows), CHECK_CHUNK):
        chunk = _checked_chunk(rows[start:start + CHECK_CHUNK], start, dialect, source, check)
        yield from enumerate(chunk, start)


def _checked_chunk(rows: Sequence[Any], first_index: int, dialect: str, source: str,
                   check: RecordsCheck | None) -> list[EditRecord | DataError]:
    outcomes: list[EditRecord | DataError] = []
    for index, raw in enumerate(rows, first_index):
        try:
            outcomes.append(adapt_record(raw, dialect, source=source, index=index))
        except DataError as error:
            outcomes.append(error)
    adapted = [(i, outcome) for i, outcome in enumerate(outcomes) if isinstance(outcome, EditRecord)]
    if check is not None and adapted:
        for (i, record), problem in zip(adapted, check([record for _, record in adapted]), strict=True):
            if problem is not None:
                outcomes[i] = _refusal(record, problem, source, first_index + i)
    return outcomes


def _refusal(record: EditRecord, problem: tuple[str, str], source: str, index: int) -> DataError:
    field, message = problem
    return DataError(f"{message} (record id {record.record_id!r})", source=source, index=index, field=field)


def _resolve_dialect(dialect: str, first_row: Any, source: str) -> str:
    if dialect == "auto":
        return detect_dialect(first_row, source=source, index=0)
    if dialect not in DIALECTS:
        raise DataError(f"unknown dialect {dialect!r}; known dialects: {', '.join(DIALECTS)}", source=source)
    return dialect


def _read_rows(source: str | Path, split: str) -> tuple[str, list[Any]]:
    """The raw rows of a source and the name errors should use for it."""
    path = Path(source)
    if path.is_file():
        if path.suffix not in JSON_SUFFIXES:
            raise DataError(f"unsupported file type {path.suffix!r}; expected one of "
                            f"{', '.join(JSON_SUFFIXES)}", source=str(path))
        return str(path), _read_local_json(path, split)
    if path.suffix in JSON_SUFFIXES:
        raise DataError("file not found", source=str(path))
    return str(source), _read_hub(str(source), split)


def _read_local_json(path: Path, split: str) -> list[Any]:
    if not _arrow_can_read(path):
        return _parse_json(path)
    try:
        # on_mixed_types=None: a field whose JSON type differs between records must fail type inference
        # rather than become datasets' catch-all Json column, which turns strings such as "1987" into numbers
        dataset = datasets.load_dataset("json", data_files={split: str(path)}, split=split,
                                        on_mixed_types=None)
    except Exception:  # noqa: BLE001 - arrow refuses mistyped records, non-object rows, empty files
        # the json module then either reads the rows (and validation names the bad record and field)
        # or says exactly where the file is not JSON
        return _parse_json(path)
    return dataset.to_list()


def _arrow_can_read(path: Path) -> bool:
    """Whether the file may go to pyarrow's JSON reader, which kills the process (a segfault, not an
    exception) when the first row is `null` and when brackets nest some thousands deep. A file whose first
    row is not an object, or that nests deeper than any edit record, is left to the json module, which
    reports it cleanly."""
    try:
        data = path.read_bytes()
    except OSError:
        return False
    if not _FIRST_ROW_IS_OBJECT.match(data):
        return False
    brackets = _JSON_STRING.sub(b"", data).translate(None, _NOT_BRACKETS)
    depth = max(itertools.accumulate(1 if bracket in b"[{" else -1 for bracket in brackets), default=0)
    return depth <= MAX_ARROW_NESTING


def _read_hub(source: str, split: str) -> list[Any]:
    try:
        dataset = datasets.load_dataset(source, split=split)
    except Exception as error:  # datasets raises many types (not found, offline, bad split...)
        raise DataError(f"cannot load dataset (split {split!r}): {error}", source=source) from error
    return dataset.to_list()


def _parse_json(path: Path) -> list[Any]:
    """Rows of a JSON array, a single JSON object, or JSON Lines."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(f"cannot read: {error}", source=str(path)) from error
    if not text.strip():
        raise DataError("empty file", source=str(path))
    try:
        document = json.loads(text)
    except json.JSONDecodeError as error:
        if text.lstrip().startswith("["):
            raise DataError(f"invalid JSON: {error}", source=str(path)) from error
        return _parse_json_lines(text, str(path))
    except (ValueError, RecursionError) as error:  # an integer too long to convert, nesting too deep
        raise DataError(f"unreadable JSON: {error}", source=str(path)) from error
    return document if isinstance(document, list) else [document]


def _parse_json_lines(text: str, source: str) -> list[Any]:
    rows = []
    for line_number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except (ValueError, RecursionError) as error:  # not JSON, or too deep or long to decode
                raise DataError(f"invalid JSON on line {line_number}: {error}", source=source,
                                index=len(rows)) from error
    return rows
