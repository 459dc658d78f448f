"""Models: loading frozen causal LMs and resolving the layer specs that name the modules to edit."""

from rledit.models.layers import EditableModule, expand_layer_spec, resolve_edit_modules
from rledit.models.loading import LoadedModel, load_model

__all__ = ["EditableModule", "LoadedModel", "expand_layer_spec", "load_model", "resolve_edit_modules"]
