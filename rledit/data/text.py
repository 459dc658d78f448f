"""Generic text for preserved-knowledge statistics: a local file, a Hub dataset, the model's own samples,
or the training records' prompts. Each source says what it is (`identity`), for caches and results.json."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from rledit.data.records import EditRecord
from rledit.errors import ConfigError


@dataclass(frozen=True)
class TextFile:
    """One text per non-empty line of a local file (WikiText-2's raw release reads as it is)."""

    path: str

    def identity(self, records: Sequence[EditRecord]) -> dict[str, Any]:
        resolved = Path(self.path).expanduser().resolve()
        stat = resolved.stat() if resolved.is_file() else None
        return {"kind": "file", "path": str(resolved), "bytes": stat.st_size if stat else None}

    def texts(self, model, tokenizer, records: Sequence[EditRecord]) -> Iterator[str]:
        path = Path(self.path).expanduser()
        if not path.is_file():
            raise ConfigError(f"stats.source.path={self.path}: no such file (one text per line expected)")
        with path.open(encoding="utf-8") as lines:
            for line in lines:
                if line.strip():
                    yield line.strip()


@dataclass(frozen=True)
class HubText:
    """A text field of a dataset that `datasets` can load (streamed: only what is used is read)."""

    path: str
    name: str | None = None
    split: str = "train"
    field: str = "text"

    def identity(self, records: Sequence[EditRecord]) -> dict[str, Any]:
        return {"kind": "hub", **asdict(self)}

    def texts(self, model, tokenizer, records: Sequence[EditRecord]) -> Iterator[str]:
        import datasets

        try:
            rows = datasets.load_dataset(self.path, self.name, split=self.split, streaming=True)
        except Exception as exc:  # datasets raises many types for a missing or unreachable dataset
            raise ConfigError(f"stats.source: cannot load dataset {self.path!r} ({self.name}, {self.split}): "
                              f"{exc}") from exc
        for row in rows:
            if self.field not in row:
                raise ConfigError(f"stats.source.field={self.field!r} is not a field of {self.path!r}; "
                                  f"it has {sorted(row)}")
            if str(row[self.field]).strip():
                yield str(row[self.field]).strip()


@dataclass(frozen=True)
class SampledText:
    """Text the model writes itself from its BOS token (seeded): needs no data at all."""

    num_texts: int = 800
    length: int = 128
    seed: int = 0
    top_k: int = 50
    batch_size: int = 32

    def identity(self, records: Sequence[EditRecord]) -> dict[str, Any]:
        return {"kind": "sampled", **asdict(self)}

    def texts(self, model, tokenizer, records: Sequence[EditRecord]) -> Iterator[str]:
        for rows in sampled_token_rows(model, tokenizer, self.num_texts, self.length, self.seed, self.top_k,
                                       self.batch_size):
            yield from tokenizer.batch_decode(rows, skip_special_tokens=True)


@torch.no_grad()
def sampled_token_rows(model, tokenizer, count: int, length: int, seed: int, top_k: int,
                       batch_size: int) -> Iterator[torch.Tensor]:
    """`count` rows of `length` tokens the model samples from its first token, `batch_size` rows at a time,
    seeded once (the caller's random state is left as it was)."""
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if start is None:
        raise ConfigError("sampling text from the model needs a tokenizer with a BOS or EOS token to start from")
    device = next(model.parameters()).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for first in tqdm(range(0, count, batch_size), desc="sampling text from the model", unit="batch",
                          leave=False):
            rows = min(batch_size, count - first)
            prompt = torch.full((rows, 1), start, dtype=torch.long, device=device)
            out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), do_sample=True,
                                 top_k=top_k, max_new_tokens=length, min_new_tokens=length,
                                 pad_token_id=tokenizer.pad_token_id)
            yield out[:, 1:]


@dataclass(frozen=True)
class RecordPrompts:
    """The training records' prompts with their true targets (the edit domain, never the evaluated records)."""

    def identity(self, records: Sequence[EditRecord]) -> dict[str, Any]:
        digest = hashlib.sha256("\n".join(r.prompt for r in records).encode()).hexdigest()[:16]
        return {"kind": "records", "num_records": len(records), "prompts_sha256": digest}

    def texts(self, model, tokenizer, records: Sequence[EditRecord]) -> Iterator[str]:
        if not records:
            raise ConfigError("stats.source=records needs training records, and the data has none")
        for record in records:
            yield record.prompt if record.target_true is None else f"{record.prompt} {record.target_true}"
