"""Preserved-knowledge statistics: the second moment C = E[k k^T] of each edited module's inputs over text.

MEMIT's prior `lambda C` and AlphaEdit's null-space projector are built from it. It is accumulated streaming
(one batch's Gram at a time, never all keys), the forward stops after the deepest module it needs, and each
module's matrix is cached on disk under a key of the model, the module, the text source and the token count,
written under a temporary name and renamed, so every editor and run that asks for the same reuses it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from rledit.atomic_write import partial_path
from rledit.data.collate import pad_right
from rledit.data.records import EditRecord
from rledit.errors import ConfigError
from rledit.paths import default_cache_dir

STATISTICS_FORMAT = 1
ACCUMULATE_DTYPES = {"float32": torch.float32, "float64": torch.float64}


class _Enough(Exception):
    """Raised by the last needed hook of a forward pass: the layers above it are not needed."""


def accumulate_second_moments(model: nn.Module, modules: Mapping[str, nn.Module],
                              batches: Iterable[tuple[torch.Tensor, torch.Tensor]], num_tokens: int | None,
                              accumulate: torch.dtype = torch.float64,
                              progress: bool = True) -> tuple[dict[str, torch.Tensor], int]:
    """sum_k k k^T / count over the first `num_tokens` non-padding tokens of `batches` ((input_ids,
    attention_mask) pairs; None: all of them), for every module's input. Returns the fp32 means and the token count."""
    device = next(model.parameters()).device
    limit = math.inf if num_tokens is None else num_tokens
    sums: dict[str, torch.Tensor] = {}
    mask_now: list[torch.Tensor] = []
    fired: list[str] = []

    def make_hook(name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            keys = args[0].reshape(-1, args[0].shape[-1])[mask_now[0].reshape(-1)].float()
            gram = (keys.T @ keys).to(accumulate)
            sums[name] = gram if name not in sums else sums[name].add_(gram)
            fired.append(name)
            if len(fired) == len(modules):
                raise _Enough

        return hook

    count = 0
    with torch.no_grad(), tqdm(total=num_tokens, desc="preserved-knowledge statistics", unit="tok",
                               disable=not progress) as bar:
        for input_ids, attention_mask in batches:  # a lazy source (the model's own samples) runs here, unhooked
            mask = attention_mask.bool()
            room = limit - count
            if int(mask.sum()) > room:  # keep exactly num_tokens: the first ones, row-major
                mask = mask & (mask.reshape(-1).cumsum(0) <= room).reshape(mask.shape)
            mask_now[:] = [mask.to(device)]
            fired.clear()
            handles = [module.register_forward_pre_hook(make_hook(name)) for name, module in modules.items()]
            try:
                model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device))
            except _Enough:
                pass
            finally:
                for handle in handles:
                    handle.remove()
            taken = int(mask.sum())
            count += taken
            bar.update(taken)
            if count >= limit:
                break
    if count == 0:
        raise ConfigError("the statistics' text source gave no tokens")
    return {name: (total / count).float() for name, total in sums.items()}, count


def token_batches(texts: Iterable[str], tokenizer, batch_size: int, max_length: int,
                  window: int = 32) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Right-padded (input_ids, attention_mask) batches of `batch_size` texts, each cut at `max_length` tokens.

    Texts are read `window` batches at a time and sorted by length inside the window, so a batch holds texts
    of about one length: with text of mixed lengths (headings and paragraphs) most of the padding goes."""
    pending: list[str] = []
    for text in texts:
        pending.append(text)
        if len(pending) == batch_size * window:
            yield from _sorted_batches(pending, tokenizer, batch_size, max_length)
            pending = []
    if pending:
        yield from _sorted_batches(pending, tokenizer, batch_size, max_length)


def _sorted_batches(texts: list[str], tokenizer, batch_size: int,
                    max_length: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    rows = sorted(tokenizer(texts, truncation=True, max_length=max_length)["input_ids"], key=len)
    for start in range(0, len(rows), batch_size):
        yield pad_right(rows[start:start + batch_size], tokenizer.pad_token_id)


def model_fingerprint(model: nn.Module) -> str:
    """A short hash of the model's name, config and a sample of every parameter (cheap even for 8B models)."""
    digest = hashlib.sha256()
    config = getattr(model, "config", None)
    digest.update(json.dumps(config.to_dict() if config is not None else {}, sort_keys=True, default=str).encode())
    for name, p in model.named_parameters():
        flat = p.detach().reshape(-1)
        sample = torch.cat([flat[:512], flat[-512:]]).float().cpu()
        digest.update(name.encode())
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()[:16]


class PreservedStatistics:
    """Computes, caches and hands out the second moments of edited modules' inputs.

    `source` is a text source of rledit.data.text; `num_tokens` how many tokens to average over (None: every
    token the source gives, for finite text such as the training records).
    """

    def __init__(self, source, num_tokens: int | None = 100_000, batch_size: int = 16, max_length: int = 256,
                 accumulate: str = "float64", cache_dir: str | None = None, progress: bool = True,
                 records: Sequence[EditRecord] = ()):
        if (num_tokens is not None and num_tokens < 1) or batch_size < 1 or max_length < 2:
            raise ConfigError(f"stats: num_tokens, batch_size must be >= 1 and max_length >= 2, got "
                              f"{num_tokens}, {batch_size}, {max_length}")
        if accumulate not in ACCUMULATE_DTYPES:
            raise ConfigError(f"stats.accumulate={accumulate!r}: expected one of {sorted(ACCUMULATE_DTYPES)}")
        self.source, self.num_tokens, self.batch_size, self.max_length = source, num_tokens, batch_size, max_length
        self.accumulate, self.progress = accumulate, progress
        self.cache_dir = Path(cache_dir or default_cache_dir()) / "statistics"
        self.records = records  # the training records, for source=records
        self.computed: dict[str, Any] = {}

    def describe(self) -> dict[str, Any]:
        """What results.json says about the statistics used."""
        return {"source": self.source.identity(self.records), "num_tokens": self.num_tokens,
                "max_length": self.max_length, "accumulate": self.accumulate, **self.computed}

    def second_moments(self, model: nn.Module, tokenizer, modules: Mapping[str, nn.Module]) -> dict[str, torch.Tensor]:
        """C for each of `modules` (fp32, on the model's device), from the cache where it is there."""
        folder = self.cache_dir / self._key(model)
        found = {name: self._read(folder / f"{name}.safetensors") for name in modules}
        missing = {name: modules[name] for name, value in found.items() if value is None}
        tokens = next((value[1] for value in found.values() if value is not None), None)  # one count per cache
        started = time.perf_counter()
        if missing:
            texts = self.source.texts(model, tokenizer, self.records)
            batches = token_batches(texts, tokenizer, self.batch_size, self.max_length)
            computed, count = accumulate_second_moments(model, missing, batches, self.num_tokens,
                                                        ACCUMULATE_DTYPES[self.accumulate], self.progress)
            if self.num_tokens is not None and count < self.num_tokens:
                raise ConfigError(f"stats: the text source gave only {count} tokens, fewer than "
                                  f"stats.num_tokens={self.num_tokens}")
            folder.mkdir(parents=True, exist_ok=True)
            for name, matrix in computed.items():
                self._write(folder / f"{name}.safetensors", matrix, count)
                found[name] = matrix, count
            tokens = count
        self.computed = {"cache": str(folder), "computed_now": sorted(missing), "tokens": tokens,
                         "seconds": round(time.perf_counter() - started, 3)}
        device = next(model.parameters()).device
        return {name: found[name][0].to(device) for name in modules}

    def _key(self, model: nn.Module) -> str:
        identity = {"format": STATISTICS_FORMAT, "model": model_fingerprint(model),
                    "source": self.source.identity(self.records), "num_tokens": self.num_tokens,
                    "max_length": self.max_length, "accumulate": self.accumulate}
        return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]

    def _read(self, path: Path) -> tuple[torch.Tensor, int] | None:
        """The cached C and the token count it averages (caches written before the count was kept: num_tokens)."""
        if not path.is_file():
            return None
        with safe_open(str(path), framework="pt") as cached:
            tokens = (cached.metadata() or {}).get("tokens")
            return cached.get_tensor("second_moment"), int(tokens) if tokens else self.num_tokens

    @staticmethod
    def _write(path: Path, matrix: torch.Tensor, tokens: int) -> None:
        staging = partial_path(path)
        save_file({"second_moment": matrix.contiguous().cpu()}, str(staging), metadata={"tokens": str(tokens)})
        os.replace(staging, path)
