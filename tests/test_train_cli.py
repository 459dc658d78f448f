"""train.py keeps the editor of the best validation score (or the last one), and sizes its streams to the data."""

from __future__ import annotations

import csv
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hydra import compose, initialize_config_dir

from rledit.editors.ridge import RidgeEditor
from rledit.errors import ConfigError
from rledit.threads import cpu_threads
from rledit.training.command import keep_best, restrict_training, train, validation_length
from rledit.training.module import EditorTrainer, StartingEditor, validation_score
from tests.test_robustness_resume import REPO, TRAIN_OVERRIDES, editor_state


def lightning_editor_state(path: Path) -> dict[str, torch.Tensor]:
    state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    return {key.removeprefix("editor."): value for key, value in state.items()}


@pytest.mark.parametrize("keep", ["best", "best_epoch", "last"])
def test_editor_checkpoint_holds_the_kept_editor(small_world_model, tmp_path, keep):
    overrides = [*TRAIN_OVERRIDES, f"model.load.cache_dir={small_world_model.path.parent.parent}",
                 f"run_dir={tmp_path}", f"training.keep={keep}", "training.checkpoint_every_n_steps=null"]
    with initialize_config_dir(version_base="1.3", config_dir=str(REPO / "configs")):
        cfg = compose(config_name="train", overrides=overrides)
    with cpu_threads(1):
        saved = editor_state(train(cfg))
    (best,) = (tmp_path / "checkpoints").glob("best-*.ckpt")
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    start = last["starting_editor"]  # validated before the first optimizer step
    best_score = float(torch.load(best, map_location="cpu", weights_only=True)["callbacks"][
        next(k for k in last["callbacks"] if "val/score" in k and "max" in k)]["best_model_score"])
    if keep == "last":
        kept = lightning_editor_state(tmp_path / "checkpoints" / "last.ckpt")
    elif keep == "best_epoch":
        kept = lightning_editor_state(best)
    else:
        kept = start["state"] if start["score"] > best_score else lightning_editor_state(best)
    assert saved.keys() == kept.keys()
    assert all(torch.equal(saved[k], kept[k]) for k in saved)


@pytest.mark.parametrize("resumed_into", ["the same folder", "another folder"])
def test_a_run_resumed_after_its_last_epoch_still_keeps_its_best_epoch(small_world_model, tmp_path, resumed_into):
    overrides = [*TRAIN_OVERRIDES, f"model.load.cache_dir={small_world_model.path.parent.parent}",
                 "training.checkpoint_every_n_steps=null", "trainer.max_epochs=1"]
    resumed_dir = tmp_path if resumed_into == "the same folder" else tmp_path / "resumed"
    with initialize_config_dir(version_base="1.3", config_dir=str(REPO / "configs")):
        cfg = compose(config_name="train", overrides=[*overrides, f"run_dir={tmp_path}"])
        resume = compose(config_name="train", overrides=[*overrides, f"run_dir={resumed_dir}",
                                                         f"resume={tmp_path / 'checkpoints' / 'last.ckpt'}"])
    with cpu_threads(1):
        kept = editor_state(train(cfg))
        start = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)[
            "starting_editor"]["state"]
        assert any(not torch.equal(kept[k], start[k]) for k in kept)  # the epoch was kept over the start
        resumed = editor_state(train(resume))  # nothing left to train: only the choice of editor is redone
    assert all(torch.equal(resumed[k], kept[k]) for k in kept)


class _Trainer(torch.nn.Module):
    """What keep_best needs of an EditorTrainer: an editor child and the starting editor."""

    def __init__(self):
        super().__init__()
        self.editor = torch.nn.Linear(3, 2)
        self.start = StartingEditor(0.5, {k: v.clone() for k, v in self.editor.state_dict().items()})
        with torch.no_grad():
            self.editor.weight.add_(1.0)  # "trained"


@pytest.mark.parametrize("start_competes", [True, False])
@pytest.mark.parametrize("best_score", [None, 0.4, 0.6])
def test_keep_best_hands_back_the_starting_editor_unless_an_epoch_beat_it(tmp_path, best_score, start_competes):
    module = _Trainer()
    trained = {k: v.clone() for k, v in module.editor.state_dict().items()}
    best_epoch = {k: v + 7.0 for k, v in module.state_dict().items()}
    path = tmp_path / "best-epoch=0.ckpt"
    torch.save({"state_dict": best_epoch}, path)
    best = SimpleNamespace(best_model_path=str(path) if best_score is not None else "",
                           best_model_score=torch.tensor(best_score if best_score is not None else 0.0))
    keep_best(module, best, start_competes=start_competes)
    if best_score is None:  # no epoch was validated
        expected = module.start.state if start_competes else trained
    elif best_score == 0.4 and start_competes:  # below the start's 0.5
        expected = module.start.state
    else:
        expected = {k.removeprefix("editor."): v for k, v in best_epoch.items()}
    assert all(torch.equal(module.editor.state_dict()[k], expected[k]) for k in expected)


@pytest.mark.parametrize("earlier_score", [0.55, 0.7])
def test_keep_best_weighs_the_resumed_runs_best_epoch_against_this_runs(tmp_path, earlier_score):
    module = _Trainer()
    paths, states = {}, {}
    for name, shift in (("earlier", 3.0), ("this", 7.0)):
        states[name] = {k: v + shift for k, v in module.state_dict().items()}
        paths[name] = tmp_path / f"{name}.ckpt"
        torch.save({"state_dict": states[name]}, paths[name])
    best = SimpleNamespace(best_model_path=str(paths["this"]), best_model_score=torch.tensor(0.6))
    keep_best(module, best, earlier=(earlier_score, str(paths["earlier"])))
    expected = states["earlier" if earlier_score > 0.6 else "this"]
    assert all(torch.equal(module.editor.state_dict()[k], expected["editor." + k]) for k in module.editor.state_dict())


def test_training_only_the_step_sizes_and_ridges_leaves_the_network_where_it_started(small_world_model, tmp_path):
    overrides = [*TRAIN_OVERRIDES, f"model.load.cache_dir={small_world_model.path.parent.parent}",
                 f"run_dir={tmp_path}", "training.keep=last", "training.checkpoint_every_n_steps=null",
                 "trainer.max_epochs=1", "training.trainable=[*log_eta,*log_lambda]"]
    with initialize_config_dir(version_base="1.3", config_dir=str(REPO / "configs")):
        cfg = compose(config_name="train", overrides=overrides)
    with cpu_threads(1):
        trained = editor_state(train(cfg))
    start = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)[
        "starting_editor"]["state"]
    network = [k for k in trained if ".blocks." in k]  # the hypernetwork's layers, e.g. bank.nets.*.blocks.0.lowrank.B
    scalars = [k for k in trained if k.endswith((".log_eta", ".log_lambda"))]
    assert network and scalars
    assert all(torch.equal(trained[k], start[k]) for k in network)
    assert any(not torch.equal(trained[k], start[k]) for k in scalars)


def test_a_trainable_pattern_that_names_no_parameter_is_refused_with_the_names_there_are():
    editor = RidgeEditor({"m": (3, 4)}, rank=2)
    with pytest.raises(ConfigError, match=r"training.trainable: '\*log_step'.*log_eta"):
        restrict_training(editor, ["*log_eta", "*log_step"])
    restrict_training(editor, "*log_eta")  # one pattern needs no list
    assert [name for name, p in editor.named_parameters() if p.requires_grad] == ["bank.nets.3x4.log_eta"]


def test_the_validation_score_is_the_mean_of_the_metrics_training_val_score_names(small_world_model, tmp_path):
    chosen = ["cf_efficacy_score", "cf_neighborhood_score", "specificity_agreement"]
    overrides = [*TRAIN_OVERRIDES, f"model.load.cache_dir={small_world_model.path.parent.parent}",
                 f"run_dir={tmp_path}", "training.checkpoint_every_n_steps=null", "trainer.max_epochs=1",
                 "logger=csv", f"training.val_score=[{','.join(chosen)}]", "training.val_sequences=2"]
    with initialize_config_dir(version_base="1.3", config_dir=str(REPO / "configs")):
        cfg = compose(config_name="train", overrides=overrides)
    with cpu_threads(1):
        train(cfg)
    (metrics,) = tmp_path.glob("logs/**/metrics.csv")
    rows = [row for row in csv.DictReader(metrics.open()) if row["val/score"]]
    assert len(rows) == 2  # the start, then the one epoch, each the mean over the two sequences
    for row in rows:
        assert float(row["val/score"]) == pytest.approx(sum(float(row[f"val/{name}"]) for name in chosen) / 3)
    start = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["starting_editor"]
    assert start["score"] == pytest.approx(float(rows[0]["val/score"]))


@pytest.mark.parametrize("val_score", [["efficacy", "cf_mean"], []])
def test_a_validation_score_of_unknown_metrics_is_refused_with_the_names_there_are(val_score):
    with pytest.raises(ConfigError, match=r"training.val_score=.*expected some of efficacy, .*cf_neighborhood_score"):
        EditorTrainer(RidgeEditor({"m": (3, 4)}, rank=2), None, None, val_score=val_score)


def test_a_validation_score_of_metrics_the_requests_do_not_define_names_them():
    scores = {"efficacy": 0.5, "specificity_agreement": 0.9}
    assert validation_score(scores, ["efficacy", "specificity_agreement"]) == pytest.approx(0.7)
    with pytest.raises(ConfigError, match="no validation request defines cf_efficacy_score .*target_true"):
        validation_score(scores, ["cf_efficacy_score", "efficacy"])


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
