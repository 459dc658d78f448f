"""rledit: lifelong knowledge editing of causal language models with hypernetwork and locate-then-edit editors."""

import rledit.paths  # noqa: F401  (registers the resolvers of the paths config group before any config is composed)
from rledit.api import (
    ConfiguredModel,
    EditedModel,
    evaluate,
    load_data,
    load_editor,
    load_model,
    make_editor,
    preserved_statistics,
)
from rledit.data.records import EditRecord, LocalityPair
from rledit.errors import ConfigError, DataError, EditRefusedError

__version__ = "0.1.0"
__all__ = ["ConfigError", "ConfiguredModel", "DataError", "EditRecord", "EditRefusedError", "EditedModel",
           "LocalityPair", "evaluate", "load_data", "load_editor", "load_model", "make_editor", "preserved_statistics"]
