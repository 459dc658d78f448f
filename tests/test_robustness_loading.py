"""Safe loading: editor checkpoints run no code, a checkpoint that does not fit is a clear ConfigError,
and no model's own code runs unless the user asks for it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rledit.errors import ConfigError
from rledit.models import loading
from rledit.pipeline import (
    EDITOR_CHECKPOINT_FORMAT,
    build_editor,
    build_experiment,
    editor_checkpoint,
    editor_from_checkpoint,
    read_editor_checkpoint,
)
from tests.conftest import composed_model_config
from tests.test_evaluate_cli import compose_config
from tests.test_loading_models import tiny_folder  # noqa: F401 (a fixture)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def experiment_and_checkpoint(small_world):
    """The small world's experiment and a valid checkpoint of an (untrained) RLEdit editor for it."""
    cfg = compose_config([*small_world, "editor=rledit", "editor.build.rank=8"])
    experiment = build_experiment(cfg)
    return experiment, editor_checkpoint(build_editor(cfg, experiment), cfg)


def load_editor_checkpoint(path: str, experiment) -> None:
    """Read the checkpoint at `path` and build its editor for the experiment's modules."""
    editor_from_checkpoint(read_editor_checkpoint(path), path, experiment.module_shapes, torch.device("cpu"))


def _touch(path: str) -> None:
    Path(path).touch()


class CodeOnLoad:
    """Unpickling this runs `_touch`: what a malicious checkpoint would do with unrestricted torch.load."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return _touch, (str(self.marker),)


def test_a_checkpoint_holding_code_is_refused_without_running_it(experiment_and_checkpoint, tmp_path):
    experiment, checkpoint = experiment_and_checkpoint
    marker, path = tmp_path / "code-ran", tmp_path / "editor.ckpt"
    torch.save({**checkpoint, "extra": CodeOnLoad(marker)}, path)
    with pytest.raises(ConfigError, match=rf"checkpoint={path} cannot be loaded with weights_only=True"):
        load_editor_checkpoint(str(path), experiment)
    assert not marker.exists()
    torch.load(path, weights_only=False)  # what an unrestricted load would have done
    assert marker.exists()


def test_a_damaged_checkpoint_is_a_config_error(experiment_and_checkpoint, tmp_path):
    experiment, checkpoint = experiment_and_checkpoint
    path = tmp_path / "editor.ckpt"
    torch.save(checkpoint, path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ConfigError, match=rf"checkpoint={path} cannot be loaded .* or is damaged"):
        load_editor_checkpoint(str(path), experiment)


def _with_build(checkpoint: dict, **build) -> dict:
    """The checkpoint with its config's editor.build changed."""
    config = {**checkpoint["config"], "editor": {**checkpoint["config"]["editor"]}}
    config["editor"]["build"] = {**config["editor"]["build"], **build}
    return {**checkpoint, "config": config}


def _mismatched(checkpoint: dict, case: str) -> tuple[dict, str]:
    """The checkpoint changed so that it no longer fits the model, and the message that must say so."""
    shapes, state = checkpoint["module_shapes"], dict(checkpoint["state_dict"])
    if case == "other modules":
        return ({**checkpoint, "module_shapes": {"model.layers.0.mlp.down_proj": [128, 256]}},
                r"trained for modules \{'model.layers.0.mlp.down")
    if case == "other shapes":
        return ({**checkpoint, "module_shapes": {name: [2 * rows, cols] for name, (rows, cols) in shapes.items()}},
                r"but this model's edited modules are \{'model.layers")
    if case == "unknown option":
        return _with_build(checkpoint, future_option=1), r"does not fit .*RidgeEditor with .*future_option"
    if case == "state of another rank":
        name = next(k for k in state if k.endswith(".A"))
        state[name] = torch.zeros(state[name].shape[0], 16)
        return {**checkpoint, "state_dict": state}, rf"does not fit .*size mismatch for {name}"
    if case == "missing state":
        del state[next(iter(state))]
        return {**checkpoint, "state_dict": state}, r"does not fit .*Missing key"
    if case == "foreign class":
        return _with_build(checkpoint, _target_="os.system"), r"names editor class 'os.system', which is not"
    if case == "incomplete":
        incomplete = {"format": EDITOR_CHECKPOINT_FORMAT, "state_dict": state}
        return incomplete, r"incomplete editor checkpoint \(missing module_shapes, config\)"
    if case == "earlier format":
        return {**checkpoint, "format": "rledit-editor/1"}, r"has format 'rledit-editor/1', .* train the editor again"
    return {**checkpoint, "format": "something/else"}, r"is not an rledit editor checkpoint"


@pytest.mark.parametrize("case", ["other modules", "other shapes", "unknown option", "state of another rank",
                                  "missing state", "foreign class", "incomplete", "earlier format",
                                  "not an editor checkpoint"])
def test_a_checkpoint_that_does_not_fit_the_model_is_a_config_error_naming_it(experiment_and_checkpoint,
                                                                            tmp_path, case):
    experiment, checkpoint = experiment_and_checkpoint
    load_editor_checkpoint(_saved(checkpoint, tmp_path / "good.ckpt"), experiment)  # the original fits
    changed, message = _mismatched(checkpoint, case)
    path = _saved(changed, tmp_path / "editor.ckpt")
    with pytest.raises(ConfigError, match=rf"(?s)^checkpoint={path} .*{message}"):
        load_editor_checkpoint(path, experiment)


def test_a_format_2_checkpoint_loads_as_trained_and_refuses_only_a_recalibration(experiment_and_checkpoint,
                                                                                tmp_path):
    experiment, checkpoint = experiment_and_checkpoint
    trained = {key: value + 0.5 if key.endswith((".log_eta", ".log_lambda")) else value
               for key, value in checkpoint["state_dict"].items()}  # learned values off their calibration
    old = {**checkpoint, "format": "rledit-editor/2",
           "state_dict": {key: value for key, value in trained.items() if ".calibrated_" not in key}}
    assert len(old["state_dict"]) < len(trained)
    path = _saved(old, tmp_path / "editor.ckpt")
    state = editor_from_checkpoint(read_editor_checkpoint(path), path, experiment.module_shapes,
                                   torch.device("cpu")).state_dict()
    assert state.keys() == trained.keys()
    for key, value in trained.items():
        learned = trained[key.replace(".calibrated_", ".")]
        torch.testing.assert_close(state[key], learned if ".calibrated_" in key else value, rtol=0, atol=0)
    with pytest.raises(ConfigError, match=rf"^checkpoint={path} has format 'rledit-editor/2', .*recalibrate=true"):
        editor_from_checkpoint(read_editor_checkpoint(path), path, experiment.module_shapes, torch.device("cpu"),
                               {"recalibrate": True})


def _saved(checkpoint: dict, path: Path) -> str:
    torch.save(checkpoint, path)
    return str(path)


@pytest.fixture
def from_pretrained_calls(monkeypatch) -> list[tuple[str, dict]]:
    """Records the keyword arguments of the model's and the tokenizer's from_pretrained (which still run)."""
    calls = []
    for name, auto_class in (("model", loading.AutoModelForCausalLM), ("tokenizer", loading.AutoTokenizer)):
        real = auto_class.from_pretrained

        def spy(*args, _real=real, _name=name, **kwargs):
            calls.append((_name, kwargs))
            return _real(*args, **kwargs)

        monkeypatch.setattr(auto_class, "from_pretrained", spy)
    return calls


def test_model_code_runs_only_when_the_user_asks(tiny_folder, from_pretrained_calls):  # noqa: F811
    loading.load_model(str(tiny_folder), device="cpu")
    assert [(name, kwargs["trust_remote_code"]) for name, kwargs in from_pretrained_calls] == [
        ("model", False), ("tokenizer", False)]
    from_pretrained_calls.clear()
    loading.load_model(str(tiny_folder), device="cpu", trust_remote_code=True)
    assert [kwargs["trust_remote_code"] for _, kwargs in from_pretrained_calls] == [True, True]


def test_every_hub_model_config_says_trust_remote_code_false():
    configs = [composed_model_config(path.stem) for path in sorted((REPO / "configs" / "model").glob("*.yaml"))]
    hub_loaded = [cfg for cfg in configs if cfg.load._target_ == "rledit.models.loading.load_model"]
    assert len(hub_loaded) >= 7
    assert all(cfg.load.trust_remote_code is False for cfg in hub_loaded), [cfg.name for cfg in hub_loaded]
