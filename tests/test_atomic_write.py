"""Temporary names of whole-file writes: a killed writer's leftovers are removed, a running writer's kept."""

from __future__ import annotations

import os
import subprocess
import sys

from rledit.atomic_write import partial_path


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_partial_path_removes_the_leftovers_of_dead_writers_only(tmp_path):
    target = tmp_path / "editor.ckpt"
    dead_file = tmp_path / f".editor.ckpt.partial-{_dead_pid()}"
    dead_file.write_bytes(b"truncated")
    dead_folder = tmp_path / f".editor.ckpt.partial-{_dead_pid()}"
    dead_folder.mkdir()
    (dead_folder / "model.safetensors").write_bytes(b"half")
    running = tmp_path / f".editor.ckpt.partial-{os.getppid()}"  # the parent is still running
    running.write_bytes(b"being written")
    other = tmp_path / f".other.ckpt.partial-{_dead_pid()}"
    other.write_bytes(b"not ours")

    path = partial_path(target)

    assert path == tmp_path / f".editor.ckpt.partial-{os.getpid()}"
    assert not dead_file.exists() and not dead_folder.exists()
    assert running.exists() and other.exists()
