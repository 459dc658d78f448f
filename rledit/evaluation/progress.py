"""Continuing an interrupted lifelong run from the state it saved every few steps into a folder.

A sequence of thousands of edits runs for hours on a CPU or a preemptible GPU; one kill should cost only the
steps since the last save. A save holds the run's records so far, the unedited model's scores, the editor's
sequence state and torch's random state, and the ledger's updates since the previous save as one more shard
(updates are most of the bytes, so each is written once). Started again with the same configuration, the run
replays the shards into the unedited weights through the ledger and continues with the next step: on the
same machine and kernels the weights are bit-identical, so the results equal those of an uninterrupted run.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from rledit.atomic_write import partial_path
from rledit.environment import describe_environment
from rledit.errors import ConfigError, RleditError
from rledit.evaluation.scoring import RequestScores
from rledit.session import EditSession

STATE_FILE = "state.pt"


@dataclass
class RunState:
    """What a lifelong run has done so far: the unedited model's scores and the records of its steps."""

    pre_edit: dict[str, float | None]
    reference: list[list[torch.Tensor]]  # the unedited model's locality predictions, for agreement
    per_step: list = field(default_factory=list)  # StepRecord of each step done
    refused: int = 0
    immediate_parts: list[RequestScores] = field(default_factory=list)  # eval_timing=immediate: each step's scores

    @property
    def steps_done(self) -> int:
        return len(self.per_step)


class RunProgress:
    """Saves a run's state into `folder` every `every` steps and gives it back to the same run started again.

    `fingerprint` is what must not change between the two (the run's configuration, less what does not move
    its results): continuing with another is refused, naming what differs.
    """

    def __init__(self, folder: str | Path, every: int, fingerprint: dict[str, Any]):
        if not isinstance(every, int) or isinstance(every, bool) or every < 1:
            raise ConfigError(f"progress_every={every!r}: must be a positive number of steps, or null for no saves")
        self.folder, self.every, self.fingerprint = Path(folder), every, fingerprint
        self.shards: list[str] = []
        self.saved_updates = 0

    def due(self, step: int) -> bool:
        return step % self.every == 0

    def resume(self, session: EditSession) -> RunState | None:
        """The saved state, with the session's weights and editor put back where the save left them; None
        when nothing was saved. The session must not have edited yet."""
        state_file = self.folder / STATE_FILE
        if not state_file.exists():
            return None
        saved = torch.load(state_file, weights_only=False)  # written by `save` below, never from elsewhere
        differing = _differences(saved["fingerprint"], self.fingerprint)
        if differing:
            raise ConfigError(f"{self.folder} holds the progress of a run configured otherwise ({', '.join(differing)} "
                              "differ): continue it with the same options, or give another run_dir")
        if len(session.ledger):
            raise RleditError("a run continues only in a session that has not edited yet")
        if saved["environment"] != describe_environment():
            print("this run was saved under another environment (CPU, kernels or packages): from here on its "
                  "rounding differs, so its results are not those of an uninterrupted run on either")
        for shard in saved["shards"]:
            session.ledger.load(self.folder / shard)
        session.editor.load_sequence_state(saved["editor"])
        torch.set_rng_state(saved["rng"])
        self.shards, self.saved_updates = list(saved["shards"]), len(session.ledger)
        return saved["run"]

    def save(self, session: EditSession, run: RunState) -> None:
        """Write the updates committed since the last save as a new shard, then the state (each whole or not at all)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        if len(session.ledger) > self.saved_updates:
            shard = f"edits-{self.saved_updates:06d}.safetensors"
            _write(self.folder / shard, lambda path: session.ledger.save(path, start=self.saved_updates))
            self.shards.append(shard)
            self.saved_updates = len(session.ledger)
        state = {"fingerprint": self.fingerprint, "shards": self.shards, "run": run,
                 "editor": session.editor.sequence_state(), "rng": torch.get_rng_state(),
                 "environment": describe_environment()}
        _write(self.folder / STATE_FILE, lambda path: torch.save(state, path))

    def finish(self) -> None:
        """The run is complete and its results written: its saved progress is no longer needed."""
        shutil.rmtree(self.folder, ignore_errors=True)


def _write(path: Path, write) -> None:
    partial = partial_path(path)
    write(partial)
    os.replace(partial, path)


def _differences(saved: dict[str, Any], current: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted names of the options whose values differ between two nested configurations."""
    differing = []
    for key in sorted(set(saved) | set(current), key=str):
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            differing += _differences(a, b, f"{prefix}{key}.")
        elif a != b or (key in saved) != (key in current):
            differing.append(f"{prefix}{key}")
    return differing
