"""What the benchmark scripts share: the repository on sys.path, config composition, timing and memory probes.

Scripts in this folder import it as `harness` (Python puts a script's own folder first on sys.path).
"""

from __future__ import annotations

import statistics
import sys
import time
import weakref
from collections.abc import Callable
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # so that scripts importing this module find rledit in a checkout

MiB = 2**20
# The edit step sections 1 and 4 time: RLEdit with one capture and one ridge solve, without preserved-knowledge
# statistics (the editor's default runs 10 rounds under MEMIT's prior).
ONE_ROUND_RLEDIT = ["editor.build.rounds=1", "editor.build.preserve_weight=0"]


def format_bytes(n: float) -> str:
    """Bytes in GiB from 1 GiB up, else in MiB."""
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / MiB:.1f} MiB"


def compose_config(config_name: str, overrides: list[str]) -> DictConfig:
    """configs/<config_name>.yaml composed with Hydra overrides, as the entry points compose it."""
    with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
        return compose(config_name, overrides=overrides)


def default_data(model: str) -> str:
    """The data config that goes with a model config: the synthetic world for tiny, CounterFact otherwise."""
    return "synthetic" if model == "tiny" else "counterfact"


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so that wall-clock intervals cover it (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fns: dict[str, Callable[[], object]], repeats: int,
                   device: torch.device) -> dict[str, float]:
    """Median wall time of each fn over repeats calls, after one warm-up call each (Triton compiles there).

    The calls are interleaved round by round, so load from other processes hits every method alike.
    """
    for fn in fns.values():
        fn()
    synchronize(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(seconds) for name, seconds in times.items()}


class LiveTensorMemory(TorchDispatchMode):
    """Live and peak bytes of the tensor storages that ops allocate on `device` while the mode is active.

    A storage counts from the op that creates it until it is freed (a finalizer on the storage). Outputs
    that alias an input (views, in-place and out= ops) are not new memory and are not counted. On a CPU
    this is the only honest peak: RSS keeps what the allocator has freed.
    """

    def __init__(self, device: torch.device):
        super().__init__()
        self.device, self.live, self.peak = device, 0, 0
        self._sizes: dict[int, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        returns = func._schema.returns
        for spec, value in zip(returns, out if len(returns) > 1 else (out,)):
            if spec.alias_info is None:
                for tensor in value if isinstance(value, (list, tuple)) else (value,):
                    if isinstance(tensor, torch.Tensor) and tensor.device == self.device:
                        self._count(tensor.untyped_storage())
        return out

    def _count(self, storage: torch.UntypedStorage) -> None:
        key = id(storage)  # a storage keeps its Python object while alive; the finalizer frees the key
        if key not in self._sizes:
            self._sizes[key] = storage.nbytes()
            self.live += self._sizes[key]
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        self.live -= self._sizes.pop(key)


def peak_bytes_of(fn: Callable[[], object], device: torch.device) -> tuple[int, str]:
    """Peak bytes that `fn` allocates on top of what was live before it, and how that was measured."""
    if device.type == "cuda":
        synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before, "cuda max_memory_allocated"
    with LiveTensorMemory(device) as tracker:
        fn()
    return tracker.peak, "live tensor bytes"
