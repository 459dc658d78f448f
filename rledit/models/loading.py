"""Load a frozen causal LM and its tokenizer: from a Hub id, a local folder, a GGUF file or a package.

Editors never train the LLM itself, so everything loaded here comes back in eval mode with every
parameter frozen, and with a pad token so that batches can be padded.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import torch
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from rledit.errors import ConfigError
from rledit.runtime import freeze, resolve_device, resolve_dtype

PACKAGE_SCHEME = "pkg://"

@dataclass
class LoadedModel:
    """A frozen model with its tokenizer; `source` is what the user asked for, for logs and reports."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    source: str


def load_model(source: str, *, gguf_file: str | None = None, dtype: str | torch.dtype = "float32",
               device: str = "auto", device_map: str | dict | None = None, trust_remote_code: bool = False,
               tokenizer_source: str | None = None) -> LoadedModel:
    """Load `source` (Hub id, local folder, path to a .gguf file, or `pkg://<package>`) frozen, in eval mode.

    With `device_map` the weights are placed by accelerate and `device` is ignored.
    """
    torch_dtype = resolve_dtype(dtype)
    location, gguf = locate_source(source, gguf_file)
    tokenizer_location, tokenizer_gguf = (location, gguf) if tokenizer_source is None \
        else locate_source(tokenizer_source, None)

    model = AutoModelForCausalLM.from_pretrained(location, gguf_file=gguf, dtype=torch_dtype,
                                                 device_map=device_map, trust_remote_code=trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_location, gguf_file=tokenizer_gguf,
                                              trust_remote_code=trust_remote_code)
    if device_map is None:
        model.to(resolve_device(device))
    freeze(model)
    ensure_pad_token(model, tokenizer, source)
    return LoadedModel(model=model, tokenizer=tokenizer, source=source)


def locate_source(source: str, gguf_file: str | None) -> tuple[str, str | None]:
    """Turn a user-facing source into (what from_pretrained takes, the GGUF file name in it or None).

    Local paths are checked here so that a typo fails with a message naming the path instead of
    a Hub lookup for a repository that does not exist.
    """
    if source.startswith(PACKAGE_SCHEME):
        folder = package_folder(source.removeprefix(PACKAGE_SCHEME))
    elif source.endswith(".gguf"):
        if gguf_file is not None:
            raise ConfigError(f"source {source!r} is already a GGUF file; "
                              f"do not also give gguf_file={gguf_file!r}")
        path = Path(source).expanduser()
        if not path.is_file():
            raise ConfigError(f"GGUF file {source!r} does not exist")
        return str(path.parent), path.name
    elif Path(source).expanduser().exists():
        folder = Path(source).expanduser()
    elif not is_hub_id(source):
        raise ConfigError(f"model path {source!r} does not exist (and is not a Hub model id)")
    else:
        return source, gguf_file

    if not folder.is_dir():
        raise ConfigError(f"model source {source!r} is not a folder")
    if gguf_file is not None and not (folder / gguf_file).is_file():
        raise ConfigError(f"GGUF file {gguf_file!r} not found in {str(folder)!r} (source {source!r})")
    return str(folder), gguf_file


def package_folder(package: str) -> Path:
    """The folder of an installed package, found without importing it (its __init__ may need extras)."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"package {package!r} (source {PACKAGE_SCHEME}{package}) is not installed")
    return Path(next(iter(spec.submodule_search_locations)))


def is_hub_id(source: str) -> bool:
    try:
        validate_repo_id(source)
    except HFValidationError:
        return False
    return True


def ensure_pad_token(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, source: str) -> None:
    """Pad with EOS when the tokenizer has no pad token (most causal LMs), and tell the model so."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ConfigError(f"tokenizer of {source!r} has neither a pad token nor an EOS token to pad with")
        tokenizer.pad_token = tokenizer.eos_token
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if model.generation_config is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
