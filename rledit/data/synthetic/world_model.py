"""The synthetic world's pretrained model: trained on the first call, cached on disk, reused after.

The cache folder is named by a hash of everything that determines the weights (world, model and
training configs and the generator/trainer versions), so a changed config never reuses a stale model.
A model is trained into a hidden temporary folder and renamed into place only when complete: an
interrupted run leaves no half-written cache behind.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from rledit.data.synthetic.pretrain import (
    DEFAULT_MODEL,
    PRETRAIN_FORMAT,
    PretrainConfig,
    check_model_overrides,
    model_config,
    pretrain,
    training_config,
)
from rledit.data.synthetic.tokenizer import build_tokenizer
from rledit.data.synthetic.world import WORLD_FORMAT, World, WorldConfig, as_world_config, build_world
from rledit.paths import default_cache_dir
from rledit.runtime import freeze, resolve_dtype

WORLD_FILE = "world.json"
REPORT_FILE = "pretraining.json"


@dataclass
class WorldModel:
    """A frozen model that knows `world`, its tokenizer, and the cache folder they were loaded from."""

    model: LlamaForCausalLM
    tokenizer: PreTrainedTokenizerFast
    world: World
    path: Path


def load_world_model(world: WorldConfig | Mapping[str, Any] | None = None,
                     model: Mapping[str, Any] | None = None,
                     training: PretrainConfig | Mapping[str, Any] | None = None,
                     cache_dir: str | Path | None = None,
                     device: str | torch.device = "cpu",
                     dtype: str | torch.dtype = "float32",
                     progress: bool = True) -> WorldModel:
    """Load the pretrained model of `world`, pretraining and caching it first if no cache exists.

    `model` overrides fields of the default `LlamaConfig`, `training` fields of `PretrainConfig`.
    """
    world_config = as_world_config(world)
    model_overrides = check_model_overrides(model)
    training = training_config(training)
    torch_dtype = resolve_dtype(dtype)
    folder = (Path(cache_dir) if cache_dir is not None else default_cache_dir()) / "synthetic" / \
        f"world-model-{cache_key(world_config, model_overrides, training)}"
    if not folder.is_dir():
        _pretrain_into(folder, world_config, model_overrides, training, progress)
    return _load(folder, device, torch_dtype)


def cache_key(world: WorldConfig, model_overrides: Mapping[str, Any], training: PretrainConfig) -> str:
    identity = {
        "world_format": WORLD_FORMAT,
        "pretrain_format": PRETRAIN_FORMAT,
        "world": asdict(world),
        "model": {**DEFAULT_MODEL, **model_overrides},
        "training": asdict(training),
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def _pretrain_into(folder: Path, world_config: WorldConfig, model_overrides: Mapping[str, Any],
                   training: PretrainConfig, progress: bool) -> None:
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        world = build_world(world_config)
        tokenizer = build_tokenizer(world)
        config = model_config(tokenizer, model_overrides)
        model, report = pretrain(world, tokenizer, config, training, progress)
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        world.save(staging / WORLD_FILE)
        (staging / REPORT_FILE).write_text(json.dumps(
            {**asdict(report), "world": asdict(world_config), "model": {**DEFAULT_MODEL, **model_overrides},
             "training": asdict(training)}, indent=1))
        try:
            staging.rename(folder)
        except OSError:
            if not folder.is_dir():  # not a concurrent run that finished first: a real failure
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _load(folder: Path, device: str | torch.device, dtype: torch.dtype) -> WorldModel:
    model = LlamaForCausalLM.from_pretrained(folder, dtype=dtype).to(device)
    freeze(model)
    return WorldModel(model=model, tokenizer=PreTrainedTokenizerFast.from_pretrained(folder),
                      world=World.load(folder / WORLD_FILE), path=folder)
