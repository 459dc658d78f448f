"""Interrupted training resumes exactly: the same sequences and editor parameters as an uninterrupted run.

The training stream is made resumable (its loader's position travels in Lightning's checkpoints), so a
checkpoint written at any optimizer step, not only at an epoch's end, resumes exactly. One test does it in
process with Lightning; the other kills `python train.py` with SIGKILL after a checkpoint and resumes it with
`resume=`. (An interrupted `save_edited` is covered by test_evaluate_cli.py: the folder is written under a
temporary name and renamed when complete.)
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import SMALL_TRAINING, SMALL_WORLD
from hydra import compose, initialize_config_dir
from lightning.pytorch.callbacks import ModelCheckpoint

from rledit.threads import cpu_threads
from rledit.training.command import train
from tests.test_ddp import build

REPO = Path(__file__).resolve().parents[1]
EPOCHS = 3  # of two sequences each (tests.test_ddp.build)


class SequenceLog(L.Callback):
    """The epoch and first record id of every training sequence rolled: which part of the stream it is."""

    def __init__(self):
        self.rolled: list[tuple[int, str]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.rolled.append((trainer.current_epoch, batch[0].records[0].record_id))


def fit(root: Path, every_n_steps: int | None, max_steps: int = -1, resume: Path | None = None):
    module, datamodule = build(normalize=True)
    log = SequenceLog()
    checkpoints = ModelCheckpoint(dirpath=root, save_last=True, every_n_train_steps=every_n_steps)
    L.Trainer(max_epochs=EPOCHS, max_steps=max_steps, logger=False, enable_progress_bar=False,
              enable_model_summary=False, num_sanity_val_steps=0, deterministic=True, accelerator="cpu",
              devices=1, callbacks=[checkpoints, log]).fit(module, datamodule=datamodule, ckpt_path=resume,
                                                           weights_only=True)
    return module.editor.state_dict(), log.rolled


@pytest.mark.parametrize(("every_n_steps", "stop_after"), [(None, 2), (1, 1), (1, 3)],
                         ids=["at-epoch-end", "mid-first-epoch", "mid-second-epoch"])
def test_training_resumed_from_a_checkpoint_continues_the_same_stream(tmp_path, every_n_steps, stop_after):
    interrupted = tmp_path / "interrupted"
    with cpu_threads(1):
        reference, all_rolled = fit(tmp_path / "reference", every_n_steps)
        _, first_part = fit(interrupted, every_n_steps, max_steps=stop_after)
        resumed, second_part = fit(interrupted, every_n_steps, resume=interrupted / "last.ckpt")
    assert len(all_rolled) == 2 * EPOCHS and first_part == all_rolled[:stop_after]
    assert second_part == all_rolled[stop_after:]  # a plain DataLoader would replay epoch 0 here
    assert reference.keys() == resumed.keys()
    assert all(torch.equal(reference[k], resumed[k]) for k in reference)


TRAIN_OVERRIDES = [
    f"model.load.world.num_subjects={SMALL_WORLD['num_subjects']}",
    f"model.load.world.objects_per_relation={SMALL_WORLD['objects_per_relation']}",
    *[f"model.load.training.{key}={value}" for key, value in SMALL_TRAINING.items()],
    "model.load.progress=false", "editor.build.rank=8", "editor.objective.sequence_length=2",
    "editor.objective.back_depth=2", "training.edits_per_step=2", "training.batches_per_epoch=8",
    "training.val_num_steps=1", "training.checkpoint_every_n_steps=1", "trainer.max_epochs=3",
    "trainer.enable_progress_bar=false", "logger=none", "cpu_threads=1"]


def editor_state(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


@pytest.mark.slow
def test_train_py_killed_mid_run_and_resumed_ends_with_the_editor_of_an_uninterrupted_run(small_world_model,
                                                                                          tmp_path):
    overrides = [*TRAIN_OVERRIDES, f"model.load.cache_dir={small_world_model.path.parent.parent}"]
    with initialize_config_dir(version_base="1.3", config_dir=str(REPO / "configs")):
        cfg = compose(config_name="train", overrides=[*overrides, f"run_dir={tmp_path / 'reference'}"])
    with cpu_threads(1):
        reference = editor_state(train(cfg))

    interrupted = tmp_path / "interrupted"
    command = [sys.executable, "train.py", *overrides]
    log = tmp_path / "interrupted.log"
    with log.open("w") as output:
        process = subprocess.Popen([*command, f"run_dir={interrupted}"], cwd=REPO, stdout=output,
                                   stderr=output)
    last = interrupted / "checkpoints" / "last.ckpt"
    try:
        deadline = time.monotonic() + 240
        while not last.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert process.poll() is None, f"train.py ended before it was interrupted: {log.read_text()[-3000:]}"
        process.send_signal(signal.SIGKILL)
    finally:
        process.kill()
        process.wait()
    assert not (interrupted / "editor.ckpt").exists()  # it really was stopped mid-run

    resumed_dir = tmp_path / "resumed"
    done = subprocess.run([*command, f"run_dir={resumed_dir}", f"resume={last}"], cwd=REPO,
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    resumed = editor_state(resumed_dir / "editor.ckpt")
    assert reference.keys() == resumed.keys()
    assert all(torch.equal(reference[k], resumed[k]) for k in reference)
