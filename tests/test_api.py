"""The Python API: the README's example as written, and the same checks and errors as the commands."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import rledit
from rledit.errors import ConfigError, DataError, EditRefusedError
from rledit.pipeline import build_editor, build_experiment, editor_checkpoint
from rledit.threads import cpu_threads
from tests.test_evaluate_cli import compose_config

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with cpu_threads(1):
        yield


@pytest.fixture(scope="module")
def small(small_world) -> rledit.ConfiguredModel:
    return rledit.load_model("tiny", *[o for o in small_world if o.startswith("model.")])


def python_example() -> str:
    section = README.read_text().split("## From Python", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)


@pytest.mark.slow
def test_the_readme_example_runs_as_written_from_another_folder(tmp_path):
    script = tmp_path / "example.py"
    script.write_text(python_example())
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True,
                          timeout=900, check=False, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    before, _, after = done.stdout.split()[-3:]
    assert float(after) > float(before) + 0.1  # the edits of the evaluation took


def test_edit_then_revert_restores_the_weights_bit_for_bit(small):
    editor = rledit.make_editor("training_free", small)
    edited = rledit.EditedModel(small.model, small.tokenizer, editor)
    weights = {n: p.detach().clone() for n, p in small.model.named_parameters()}
    record = small.loaded.world.edit_requests(small.loaded.world.subjects[:2], seed=0)[0]
    edited.edit([{"prompt": record.prompt, "target_new": record.target_new}, record])
    assert edited.num_edits == 1
    assert any(not torch.equal(p, weights[n]) for n, p in small.model.named_parameters())
    edited.revert()
    assert all(torch.equal(p, weights[n]) for n, p in small.model.named_parameters())


def test_bad_requests_name_the_request_and_field(small):
    edited = rledit.EditedModel(small.model, small.tokenizer, rledit.make_editor("training_free", small))
    with pytest.raises(DataError, match=r"record 1, field 'target_new'"):
        edited.edit([{"prompt": "a", "target_new": "b"}, {"prompt": "a", "target_new": ""}])
    with pytest.raises(DataError, match=r"record 0, field 'answer_new'"):
        edited.edit([{"prompt": "a", "answer_new": "b"}])
    with pytest.raises(ConfigError, match="no edit requests"):
        edited.edit([])
    assert edited.num_edits == 0


def test_a_refused_edit_leaves_the_model_as_it_was(small, monkeypatch):
    editor = rledit.make_editor("training_free", small)
    edited = rledit.EditedModel(small.model, small.tokenizer, editor)
    weights = {n: p.detach().clone() for n, p in small.model.named_parameters()}
    real = editor.predict_update

    def poisoned(*args):
        update = real(*args)
        name = next(iter(update))
        update[name].P.fill_(float("nan"))
        return update

    monkeypatch.setattr(editor, "predict_update", poisoned)
    with pytest.raises(EditRefusedError):
        edited.edit([{"prompt": "The occupation of Systyn is", "target_new": "painter"}])
    assert edited.num_edits == 0
    assert all(torch.equal(p, weights[n]) for n, p in small.model.named_parameters())


def test_unknown_editors_and_non_checkpoints_are_config_errors(small, tmp_path):
    with pytest.raises(ConfigError, match="no editor config 'memitt'"):
        rledit.make_editor("memitt", small)
    not_a_checkpoint = tmp_path / "editor.ckpt"
    not_a_checkpoint.write_text("[1, 2, 3]")
    with pytest.raises(ConfigError, match=re.escape(str(not_a_checkpoint))):
        rledit.load_editor(not_a_checkpoint, small.model)
    with pytest.raises(ConfigError, match="no such file"):
        rledit.load_editor(tmp_path / "missing.ckpt", small.model)


def test_load_editor_rebuilds_a_checkpoint_for_the_modules_it_was_trained_for(small_world, tmp_path):
    cfg = compose_config([*small_world, "editor=rledit", "editor.build.rank=8",
                          "model.edit_modules=[model.layers.1.mlp.down_proj]"])
    trained = build_editor(cfg, experiment := build_experiment(cfg))
    torch.nn.init.normal_(next(p for p in trained.parameters() if p.dim() == 2))
    path = tmp_path / "editor.ckpt"
    torch.save(editor_checkpoint(trained, cfg), path)
    loaded = rledit.load_editor(path, experiment.model)
    assert loaded.module_shapes == {"model.layers.1.mlp.down_proj": (128, 256)}
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), trained.state_dict().values()))
