"""train.py keeps the editor of the best validation score (or the last one), and sizes its streams to the data."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from rledit.errors import ConfigError
from rledit.threads import cpu_threads
from rledit.training.command import train, validation_length
from tests.test_robustness_resume import REPO, TRAIN_OVERRIDES, editor_state


def lightning_editor_state(path: Path) -> dict[str, torch.Tensor]:
    state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    return {key.removeprefix("editor."): value for key, value in state.items()}


@pytest.mark.parametrize("keep", ["best", "last"])
def test_editor_checkpoint_holds_the_kept_editor(small_world_model, tmp_path, keep):
    overrides = [*TRAIN_OVERRIDES, f"model.load.cache_dir={small_world_model.path.parent.parent}",
                 f"run_dir={tmp_path}", f"training.keep={keep}", "training.checkpoint_every_n_steps=null"]
    with initialize_config_dir(version_base="1.3", config_dir=str(REPO / "configs")):
        cfg = compose(config_name="train", overrides=overrides)
    with cpu_threads(1):
        saved = editor_state(train(cfg))
    (best,) = (tmp_path / "checkpoints").glob("best-*.ckpt")
    kept = lightning_editor_state(best if keep == "best" else tmp_path / "checkpoints" / "last.ckpt")
    assert saved.keys() == kept.keys()
    assert all(torch.equal(saved[k], kept[k]) for k in saved)


def test_an_unknown_keep_option_is_named(small_world_model, tmp_path):
    overrides = [*TRAIN_OVERRIDES, f"model.load.cache_dir={small_world_model.path.parent.parent}",
                 f"run_dir={tmp_path}", "training.keep=first"]
    with initialize_config_dir(version_base="1.3", config_dir=str(REPO / "configs")):
        cfg = compose(config_name="train", overrides=overrides)
    with pytest.raises(Exception, match="training.keep='first'"):
        train(cfg)


def _default_config(*overrides: str):
    with initialize_config_dir(version_base="1.3", config_dir=str(REPO / "configs")):
        return compose(config_name="train", overrides=list(overrides))


def test_a_training_sequence_longer_than_the_training_records_names_both_options():
    cfg = _default_config("training.edits_per_step=20", "data=zsre")
    with pytest.raises(ConfigError, match=r"editor.objective.sequence_length=50 x training.edits_per_step=20 = "
                                          r"1000 .* data=zsre has 700 training records"):
        validation_length(cfg, n_train=700, n_eval=300, sequence_length=50)


def test_the_validation_sequence_is_shortened_to_the_held_out_records_with_a_warning():
    cfg = _default_config("training.edits_per_step=20", "training.val_num_steps=50")
    assert validation_length(cfg, n_train=1200, n_eval=1200, sequence_length=50) == 50
    with pytest.warns(UserWarning, match="training.val_num_steps=50 .* validating on 15 steps"):
        assert validation_length(cfg, n_train=1200, n_eval=300, sequence_length=50) == 15
