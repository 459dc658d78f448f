"""The installed commands run from any folder: configs ship inside the package, paths resolve through
the `paths` group, and a wheel carries every config file."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from rledit.paths import CONFIG_DIR

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SHARED_DATA = REPO.parent / "shared" / "data"


def run(command: list[str], cwd: Path) -> subprocess.CompletedProcess:
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_a_multirun_writes_each_job_into_the_sweep_folder_where_the_sweep_command_collects_them(small_world,
                                                                                              tmp_path):
    assert not tmp_path.is_relative_to(REPO)
    run([str(BIN / "rledit-evaluate"), "-m", *small_world, "edits_per_step=2,4", "total_edits=8",
         f"hydra.sweep.dir={tmp_path / 'sweep'}"], cwd=tmp_path)
    results = json.loads((tmp_path / "sweep" / "0" / "results.json").read_text())
    assert (results["protocol"]["num_requests"], results["protocol"]["edits_per_step"]) == (8, 2)
    run([str(BIN / "rledit-sweep"), str(tmp_path / "sweep")], cwd=tmp_path)
    assert len((tmp_path / "sweep" / "comparison.csv").read_text().splitlines()) == 3


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"real data folder {SHARED_DATA} is absent")
def test_data_paths_resolve_from_another_folder(tmp_path):
    done = run([str(BIN / "rledit-evaluate"), "--cfg", "job", "--resolve", "data=counterfact"], cwd=tmp_path)
    train = next(line.split(": ", 1)[1] for line in done.stdout.splitlines() if line.strip().startswith("train:"))
    assert Path(train).resolve() == (SHARED_DATA / "counterfact" / "counterfact-train.json").resolve()
    elsewhere = tmp_path / "data"
    done = run([str(BIN / "rledit-evaluate"), "--cfg", "job", "--resolve", "data=zsre", f"paths.data={elsewhere}"],
               cwd=tmp_path)
    assert f"train: {elsewhere}/zsre/zsre_mend_train-1k.json" in done.stdout


def test_the_wheel_carries_every_config_file(tmp_path):
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path),
         str(REPO)], cwd=tmp_path)
    wheel = next(tmp_path.glob("rledit-*.whl"))
    packed = {name for name in zipfile.ZipFile(wheel).namelist() if name.startswith("rledit/configs/")}
    shipped = {f"rledit/configs/{p.relative_to(CONFIG_DIR)}" for p in CONFIG_DIR.rglob("*.yaml")}
    assert shipped and shipped <= packed
