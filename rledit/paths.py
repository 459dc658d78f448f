"""Where rledit finds data and keeps caches, for the configs (the `paths` group) and for Python callers."""

from __future__ import annotations

import os
from pathlib import Path

from omegaconf import OmegaConf

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
"""The Hydra configs, shipped inside the package (the checkout's top-level `configs` links here)."""

CHECKOUT_ROOT = Path(__file__).resolve().parents[1]
"""The folder above the rledit package: the repository root in a checkout (site-packages when installed)."""


def default_cache_dir() -> Path:
    """$RLEDIT_CACHE, else ~/.cache/rledit: pretrained synthetic worlds and preserved-knowledge statistics."""
    return Path(os.environ.get("RLEDIT_CACHE") or Path.home() / ".cache" / "rledit")


OmegaConf.register_new_resolver("rledit_root", lambda: str(CHECKOUT_ROOT), replace=True)
OmegaConf.register_new_resolver("rledit_cache", lambda: str(default_cache_dir()), replace=True)
