"""Every config file composes, and every object the entry points build from it instantiates (models and
data are resolved to their callables, not loaded: that is the loading tests' job)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import get_method, instantiate
from omegaconf import OmegaConf

from rledit.editors.base import Editor
from rledit.evaluation.runner import Protocol
from rledit.paths import CONFIG_DIR
from rledit.training.rollout import Objective

GROUPS = sorted(p.name for p in CONFIG_DIR.iterdir() if p.is_dir() and p.name != "base")  # base/: shared parts
SHAPES = {"model.layers.0.mlp.down_proj": (8, 16), "model.layers.1.mlp.down_proj": (8, 16)}
REPO = Path(__file__).resolve().parents[1]
ONE_MODULE = {"model.layers.0.mlp.down_proj": (8, 16)}


def options(group: str) -> list[str]:
    return sorted(str(p.relative_to(CONFIG_DIR / group).with_suffix("")) for p in (CONFIG_DIR / group).rglob("*.yaml"))


def entry_point(group: str, option: str) -> str:
    """train for the training-only groups and files, evaluate for everything else."""
    return "train" if group in ("callbacks", "trainer") or option.endswith("train") or option == "train-fast" \
        else "evaluate"


def composed(config: str, *overrides: str):
    with initialize_config_dir(str(CONFIG_DIR), version_base=None):
        cfg = compose(config, overrides=list(overrides))
    OmegaConf.resolve(cfg)  # every interpolation must resolve
    return cfg


CASES = [(group, option) for group in GROUPS for option in options(group)
         if not (group == "stats" and option.startswith("source/"))]


def test_every_group_has_options_and_the_cases_cover_them():
    assert {"callbacks", "data", "debug", "editor", "experiment", "model", "paths", "stats", "trainer"} <= set(GROUPS)
    assert len(CASES) >= 30


@pytest.mark.parametrize(("group", "option"), CASES, ids=[f"{g}={o}" for g, o in CASES])
def test_every_config_composes_and_its_objects_instantiate(group, option, tmp_path):
    override = f"stats/source={option.split('/', 1)[1]}" if group == "stats" and "/" in option else f"{group}={option}"
    cfg = composed(entry_point(group, option), override, f"run_dir={tmp_path}")
    get_method(cfg.model.load._target_)
    get_method(cfg.data.records._target_)
    if cfg.get("checkpoint") is None and cfg.editor.get("build"):
        shapes = ONE_MODULE if cfg.editor.name == "rome" else SHAPES
        assert isinstance(instantiate(cfg.editor.build)(module_shapes=shapes), Editor)
    if cfg.get("logger"):
        instantiate(cfg.logger)
    if cfg.get("stats"):
        assert callable(instantiate(cfg.stats))
    for callback in (cfg.get("callbacks") or {}).values():
        instantiate(callback)
    if "trainer" in cfg:
        assert instantiate(cfg.trainer, logger=False, enable_progress_bar=False) is not None
        assert isinstance(instantiate(cfg.editor.objective), Objective)
        assert callable(instantiate(cfg.datamodule, _partial_=True))
        assert callable(instantiate(cfg.module, _partial_=True))
    if "protocol" in cfg:
        assert isinstance(instantiate(cfg.protocol, num_steps=2), Protocol)


@pytest.mark.parametrize("source", options("stats/source"))
def test_every_statistics_source_instantiates(source):
    cfg = composed("evaluate", f"stats/source={source}")
    assert instantiate(cfg.stats.source) is not None or source == "records"


def test_an_experiment_sets_what_its_row_ran():
    cfg = composed("evaluate", "experiment=smollm2-cf-locate-500")
    assert (cfg.model.name, cfg.data.name, cfg.editor.name, cfg.num_steps, cfg.edits_per_step) == \
        ("smollm2-135m", "counterfact", "alphaedit", 25, 20)
    assert Path(cfg.stats.source.path).name == "wiki.valid.txt"
    assert composed("evaluate", "experiment=smollm2-cf-locate-500", "editor=memit").editor.name == "memit"


DOCUMENTS = ("README.md", "BENCHMARKS.md")


def documented_experiments() -> dict[str, set[str]]:
    """experiment=NAME as the documents write it, NAME -> the documents that do."""
    named: dict[str, set[str]] = {}
    for document in DOCUMENTS:
        for name in re.findall(r"experiment=([a-z0-9][\w./-]*[\w])", (REPO / document).read_text()):
            named.setdefault(name, set()).add(document)
    return named


def shared_experiments() -> set[str]:
    """Experiments that other experiments build on (a table's common settings), named by their rows instead."""
    shared = set()
    for path in (CONFIG_DIR / "experiment").rglob("*.yaml"):
        for entry in OmegaConf.load(path).get("defaults", []):
            if isinstance(entry, str) and entry != "_self_":
                shared.add(entry.removeprefix("/experiment/"))
    return shared


def test_every_documented_row_is_an_experiment_and_every_experiment_is_documented():
    files, named = set(options("experiment")), documented_experiments()
    assert not set(named) - files, f"documents name experiments that do not exist: {sorted(set(named) - files)}"
    unnamed = files - set(named) - shared_experiments()
    assert not unnamed, f"experiments no document names: {sorted(unnamed)}"


@pytest.mark.parametrize("name", sorted(documented_experiments()))
def test_every_documented_experiment_composes_with_its_entry_point(name, tmp_path):
    cfg = composed(entry_point("experiment", name), f"experiment={name}", f"run_dir={tmp_path}")
    assert cfg.model.name and cfg.data.name
