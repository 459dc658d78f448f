"""The console scripts `rledit-train`, `rledit-evaluate` and `rledit-sweep` (and `python train.py` /
`python evaluate.py` in a checkout): Hydra entry points over the configs that ship inside the package."""

from __future__ import annotations

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from rledit.evaluation.command import evaluate
from rledit.paths import CONFIG_DIR
from rledit.threads import cpu_threads
from rledit.training.command import train


@hydra.main(config_path=str(CONFIG_DIR), config_name="train", version_base="1.3")
def train_main(cfg: DictConfig) -> None:
    with cpu_threads(cfg.cpu_threads):
        train(_in_sweep_folder(cfg))


@hydra.main(config_path=str(CONFIG_DIR), config_name="evaluate", version_base=None)
def evaluate_main(cfg: DictConfig) -> None:
    evaluate(_in_sweep_folder(cfg))


def _in_sweep_folder(cfg: DictConfig) -> DictConfig:
    """In a multirun (-m) each job writes into its own folder of the sweep (multirun/<date>/<time>/<job>),
    where `rledit-sweep` collects them, instead of all jobs sharing one run_dir."""
    if HydraConfig.get().mode == RunMode.MULTIRUN:
        cfg.run_dir = HydraConfig.get().runtime.output_dir
    return cfg
