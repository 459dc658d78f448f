"""What a run's numbers depend on beyond its config: package versions, the processor and the kernels torch picked.

A thousand sequential edits carry rounding differences forward, so the same config can score differently under
another kernel set (torch's AVX-512 against its AVX2 kernels, say): results record it to make that traceable.
"""

from __future__ import annotations

import os
import platform
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch

PACKAGES = ("torch", "transformers", "numpy", "lightning", "datasets", "triton")
KERNEL_VARIABLES = ("ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS", "OMP_NUM_THREADS")


def describe_environment() -> dict[str, object]:
    """Versions, processor, torch's CPU kernel set and thread count, the GPU if one is used."""
    return {
        "python": platform.python_version(),
        "packages": {name: _version(name) for name in PACKAGES},
        "processor": _processor_name(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch_threads": torch.get_num_threads(),
        "kernel_variables": {name: os.environ[name] for name in KERNEL_VARIABLES if name in os.environ},
        "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def _version(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def _processor_name() -> str:
    """The CPU's model name (Linux's /proc/cpuinfo), else what `platform` knows."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()
