"""rledit-sweep's table: runs that differ only in their seeds (and in options that keep results, such as
threads and progress saves) are averaged into one row."""

from __future__ import annotations

import json

import pytest

from rledit.evaluation import sweep
from rledit.evaluation.report import RESULTS_FILE


def write_run(folder, seed, cf_efficacy, agreement, init_shift=0.3, **options):
    metrics = {"cf_efficacy_score": cf_efficacy, "cf_paraphrase_score": 0.5, "cf_neighborhood_score": 0.6,
               "specificity_agreement": agreement, "perplexity": 60.0 + seed}
    document = {"editor": {"name": "training_free"}, "refused_edits": 0, "metrics": metrics,
                "pre_edit": {"cf_neighborhood_score": 0.66, "perplexity": 58.0},
                "protocol": {"num_steps": 5, "edits_per_step": 2, "num_requests": 10, "seed": seed},
                "timing": {"edit_seconds_per_step": 1.0, "edit_seconds_total": 5.0},
                "config": {"seed": seed, "run_dir": str(folder), "data": {"records": {"seed": seed}},
                           "editor": {"build": {"init_shift": init_shift}}, **options}}
    folder.mkdir(parents=True)
    (folder / RESULTS_FILE).write_text(json.dumps(document))


def test_seeds_of_one_configuration_are_averaged_and_other_configurations_kept_apart(tmp_path):
    write_run(tmp_path / "a0", seed=0, cf_efficacy=0.8, agreement=0.7)
    write_run(tmp_path / "a1", seed=1, cf_efficacy=0.6, agreement=0.7, cpu_threads=2, progress_every=10)
    write_run(tmp_path / "b0", seed=0, cf_efficacy=0.2, agreement=1.0, init_shift=0.1)
    rows = sweep.collect(tmp_path)
    assert len(rows) == 2
    averaged = next(r for r in rows if r["seeds"] == "0,1")
    assert averaged["cf_efficacy_score"] == pytest.approx(0.7)
    assert averaged["perplexity"] == pytest.approx(60.5)
    assert averaged["cf_mean"] == pytest.approx((0.7 + 0.5 + 0.6 + 0.7) / 4)
    assert averaged["cf_mean_sd"] == pytest.approx(0.05 / 2 ** 0.5)  # the two runs' means of four: 0.65 and 0.60
    single = next(r for r in rows if r["seeds"] == "0")
    assert single["cf_mean"] == pytest.approx((0.2 + 0.5 + 0.6 + 1.0) / 4) and single["cf_mean_sd"] is None
    assert single["unedited_cf_neighborhood"] == 0.66


def test_a_folder_without_runs_is_named(tmp_path):
    from rledit.errors import ConfigError

    with pytest.raises(ConfigError, match=f"no {RESULTS_FILE} below {tmp_path}"):
        sweep.collect(tmp_path)
