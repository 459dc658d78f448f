"""An interrupted evaluate.py run continues from its saved progress with the results of an uninterrupted one."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir

from rledit.errors import ConfigError
from rledit.evaluation import runner
from rledit.evaluation.command import PROGRESS_FOLDER, evaluate
from rledit.evaluation.progress import STATE_FILE
from rledit.paths import CONFIG_DIR

EDITORS = {  # the ridge editors' key memory and calibration; AlphaEdit's key memory and its turn among groups
    "training_free": [],
    "alphaedit": ["model.locate_modules=['model.layers.{0-1}.mlp.down_proj']", "editor.build.module_groups=2",
                  "editor.build.z_steps=2"],
}


class Killed(Exception):
    """Stands for the kill that interrupts a run."""


def run(overrides: list[str]) -> dict:
    with initialize_config_dir(version_base=None, config_dir=str(CONFIG_DIR)):
        return evaluate(compose(config_name="evaluate", overrides=overrides))


def kill_at_step(monkeypatch, step: int) -> None:
    """Make the run die as it starts edit step `step` (1-based)."""
    edit, calls = runner._timed_edit, []

    def dying(*args, **kwargs):
        calls.append(1)
        if len(calls) == step:
            raise Killed
        return edit(*args, **kwargs)

    monkeypatch.setattr(runner, "_timed_edit", dying)


@pytest.mark.parametrize("editor", sorted(EDITORS))
def test_a_run_killed_after_a_save_continues_to_the_results_of_an_uninterrupted_run(small_world, tmp_path,
                                                                                     monkeypatch, editor):
    options = [*small_world, "num_steps=5", "metrics.generation=false", f"editor={editor}", *EDITORS[editor],
               f"stats.cache_dir={tmp_path / 'cache'}"]
    whole = run([*options, f"run_dir={tmp_path / 'whole'}"])

    interrupted = [*options, f"run_dir={tmp_path / 'interrupted'}", "progress_every=3"]
    with monkeypatch.context() as patch:
        kill_at_step(patch, 5)  # steps 1-4 done, saved after step 3 (an odd count: the other layer group's turn)
        with pytest.raises(Killed):
            run(interrupted)
    progress = tmp_path / "interrupted" / PROGRESS_FOLDER
    assert (progress / STATE_FILE).is_file() and len(list(progress.glob("edits-*.safetensors"))) == 1
    continued = run(interrupted)

    assert continued["metrics"] == whole["metrics"] and continued["pre_edit"] == whole["pre_edit"]
    assert [s["update_norms"] for s in continued["per_step"]] == [s["update_norms"] for s in whole["per_step"]]
    assert [s["step"] for s in continued["per_step"]] == [1, 2, 3, 4, 5]
    assert not progress.exists()  # removed once the results are written


def test_continuing_with_other_options_is_refused_naming_them(small_world, tmp_path, monkeypatch):
    options = [*small_world, "num_steps=4", "metrics.generation=false", f"run_dir={tmp_path / 'run'}",
               "progress_every=1"]
    with monkeypatch.context() as patch:
        kill_at_step(patch, 2)
        with pytest.raises(Killed):
            run(options)
    with pytest.raises(ConfigError, match=r"edits_per_step, protocol\.edits_per_step differ"):
        run([*options, "edits_per_step=3"])
    resumed = run([*options, "cpu_threads=2", "progress_every=3"])  # neither moves the results
    assert resumed["protocol"]["num_steps"] == 4


def test_progress_every_must_be_a_positive_number_of_steps(small_world, tmp_path):
    with pytest.raises(ConfigError, match="progress_every=0"):
        run([*small_world, f"run_dir={tmp_path}", "progress_every=0"])
