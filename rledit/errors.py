"""The project's own error types: every bad input surfaces as one of these, with a message a user can act on."""

from __future__ import annotations


class RleditError(Exception):
    """Base class of every error rledit raises on purpose."""


class DataError(RleditError, ValueError):
    """A data file or record is unusable; names the file, the record index and the field at fault."""

    def __init__(self, message: str, *, source: str | None = None, index: int | None = None,
                 field: str | None = None):
        self.source, self.index, self.field = source, index, field
        where = []
        if source is not None:
            where.append(f"file {source}")
        if index is not None:
            where.append(f"record {index}")
        if field is not None:
            where.append(f"field '{field}'")
        super().__init__(f"{', '.join(where)}: {message}" if where else message)


class LayerSpecError(RleditError, ValueError):
    """A layer spec matches no module, or a matched module is not an editable linear map."""


class ConfigError(RleditError, ValueError):
    """A configuration option has a value rledit cannot use."""


class KernelInputError(RleditError, ValueError):
    """A tensor given to the fused low-rank update has the wrong shape, dtype, device or layout."""


class EditRefusedError(RleditError, RuntimeError):
    """An update was refused (non-finite or malformed); the model was left exactly as it was."""


class PretrainingError(RleditError, RuntimeError):
    """The synthetic world's model did not learn its world within the training budget."""
