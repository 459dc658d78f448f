"""evaluate.py end to end on a small synthetic world: results, plot, reproducibility, W&B offline, saved edits."""

from __future__ import annotations

import csv
import json
import struct
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import pytest
import torch
from hydra import compose, initialize_config_dir
from transformers import AutoModelForCausalLM

from rledit.data.streams import EditStream
from rledit.errors import ConfigError
from rledit.evaluation.command import evaluate, heldout_rows
from rledit.evaluation.saved_edits import (
    EDITS_FILE,
    ORIGINALS_FILE,
    open_saved_edits,
    revert_saved_edits,
    save_edited_model,
)
from rledit.evaluation.scoring import RequestScorer
from rledit.pipeline import build_editor, build_experiment, editor_checkpoint, set_up_editor
from rledit.session import EditSession

REPO = Path(__file__).resolve().parents[1]
RATES = ("efficacy", "generalization", "specificity", "specificity_agreement")


@pytest.fixture(autouse=True, scope="module")
def _reuses_the_session_world_model(small_world_model):
    """Every run of this module must load the conftest model, never pretrain a second one."""
    yield
    assert [p.name for p in small_world_model.path.parent.iterdir() if not p.name.startswith(".")] == \
        [small_world_model.path.name]


def compose_config(overrides: list[str]):
    with initialize_config_dir(version_base=None, config_dir=str(REPO / "configs")):
        return compose(config_name="evaluate", overrides=overrides)


def run_in_process(overrides: list[str]) -> dict:
    return evaluate(compose_config(overrides))


@pytest.fixture(scope="module")
def script_run(small_world, tmp_path_factory):
    """`python evaluate.py` in a subprocess (the real entry point): (run folder, its stdout)."""
    run_dir = tmp_path_factory.mktemp("script") / "run"
    done = subprocess.run([sys.executable, "evaluate.py", *small_world, f"run_dir={run_dir}"], cwd=REPO,
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return run_dir, done.stdout


@pytest.fixture(scope="module")
def saving_run(small_world, tmp_path_factory):
    """The same command in this process, also saving the edited model: (config, results, saved folder)."""
    root = tmp_path_factory.mktemp("saving")
    cfg = compose_config([*small_world, f"run_dir={root / 'run'}", f"save_edited={root / 'edited'}"])
    threads = torch.get_num_threads()
    results = evaluate(cfg)
    assert torch.get_num_threads() == threads  # cpu_threads=1 applies to the run only
    return cfg, results, root / "edited"


def test_evaluate_py_writes_results_csv_and_plot(script_run):
    run_dir, stdout = script_run
    assert "training_free editor, which needs no training" in stdout
    assert "python train.py" in stdout and "checkpoint=" in stdout

    results = json.loads((run_dir / "results.json").read_text())
    for part in ("metrics", "pre_edit"):
        assert all(0.0 <= results[part][name] <= 1.0 for name in RATES), results[part]
    assert set(results["pre_edit"]) == set(results["metrics"])
    assert results["pre_edit"]["specificity_agreement"] == 1.0
    assert results["metrics"]["efficacy"] > results["pre_edit"]["efficacy"]  # the editor edits
    assert results["metrics"]["perplexity"] > 1.0
    assert set(results["metric_definitions"]) == set(results["metrics"])
    assert results["protocol"] == {"num_steps": 3, "edits_per_step": 4, "eval_timing": "final", "curve_every": 1,
                                   "seed": 0, "eval_batch_size": 64, "num_requests": 12}
    assert len(results["per_step"]) == 3 and results["per_step"][-1]["edits"] == 12
    assert results["timing"]["edit_seconds_total"] == pytest.approx(
        sum(s["edit_seconds"] for s in results["per_step"]))
    assert results["timing"]["peak_memory_bytes"] > 0
    assert results["refused_edits"] == 0 and results["skipped_records"] == 0
    assert results["config"]["model"]["name"] == "tiny" and results["config"]["run_dir"] == str(run_dir)
    environment = results["environment"]  # what the numbers depend on beyond the config
    assert environment["torch_cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert environment["packages"]["torch"] == torch.__version__ and environment["cuda_device"] is None
    editor = results["editor"]
    assert {key: editor[key] for key in ("name", "checkpoint", "class")} == {
        "name": "training_free", "checkpoint": None, "class": "rledit.editors.training_free.TrainingFreeEditor"}
    assert editor["statistics"]["tokens"] > 0  # the default editor keeps preserved knowledge: it says whose
    assert editor["statistics"]["source"]["kind"] == "records"  # the world's: its training subjects' facts

    with (run_dir / "per_step.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [1, 2, 3]
    assert float(rows[-1]["total_update_norm"]) == pytest.approx(results["per_step"][-1]["total_update_norm"])
    image = matplotlib.image.imread(run_dir / "metrics.png")
    assert image.shape[0] > 500 and image.shape[1] > 800
    assert image[..., :3].std() > 0.05  # not a blank canvas


def test_the_same_command_twice_gives_identical_metrics(script_run, saving_run):
    """The subprocess run and the in-process run are the same command and seed (saving changes nothing)."""
    first = json.loads((script_run[0] / "results.json").read_text())
    second = saving_run[1]
    assert first["metrics"] == second["metrics"] and first["pre_edit"] == second["pre_edit"]
    assert [s["update_norms"] for s in first["per_step"]] == [s["update_norms"] for s in second["per_step"]]


def test_an_editor_checkpoint_is_evaluated_in_place_of_the_configured_editor(small_world, saving_run, tmp_path):
    cfg, reference, _ = saving_run
    experiment = build_experiment(cfg)
    checkpoint = tmp_path / "editor.ckpt"
    torch.save(editor_checkpoint(build_editor(cfg, experiment), cfg), checkpoint)
    results = run_in_process([*small_world, f"checkpoint={checkpoint}", "editor=mend", f"run_dir={tmp_path / 'run'}"])
    assert {key: results["editor"][key] for key in ("name", "checkpoint", "class")} == {
        "name": "training_free", "checkpoint": str(checkpoint), "class": "rledit.editors.training_free.TrainingFreeEditor"}
    assert results["metrics"] == reference["metrics"]


def test_a_checkpoint_edits_the_modules_it_was_trained_for(small_world, tmp_path, capsys):
    """No need to repeat `model.edit_modules`: the checkpoint's modules are edited, and the run says so."""
    trained_for = "model.layers.1.mlp.down_proj"
    cfg = compose_config([*small_world, f"model.edit_modules=[{trained_for}]"])
    checkpoint = tmp_path / "editor.ckpt"
    torch.save(editor_checkpoint(build_editor(cfg, build_experiment(cfg)), cfg), checkpoint)
    results = run_in_process([*small_world, f"checkpoint={checkpoint}", "num_steps=2", f"run_dir={tmp_path / 'run'}"])
    assert [list(step["update_norms"]) for step in results["per_step"]] == [[trained_for]] * 2
    assert f"edits the modules it was trained for, ['{trained_for}']" in capsys.readouterr().out


def test_checkpoint_options_replace_the_checkpoints_build_options(small_world, saving_run, tmp_path):
    """rounds=2 at evaluation changes what the checkpoint's editor does; a misspelt option or options with no
    checkpoint are refused by name."""
    cfg, reference, _ = saving_run
    checkpoint = tmp_path / "editor.ckpt"
    torch.save(editor_checkpoint(build_editor(cfg, build_experiment(cfg)), cfg), checkpoint)
    results = run_in_process([*small_world, f"checkpoint={checkpoint}", "+checkpoint_options.rounds=2",
                              f"run_dir={tmp_path / 'run'}"])
    assert results["editor"]["checkpoint_options"] == {"rounds": 2}
    assert results["metrics"]["efficacy"] != reference["metrics"]["efficacy"]
    with pytest.raises(ConfigError, match="does not fit .*rouns"):
        run_in_process([*small_world, f"checkpoint={checkpoint}", "+checkpoint_options.rouns=2",
                        f"run_dir={tmp_path / 'bad'}"])
    with pytest.raises(ConfigError, match="checkpoint_options=.*no checkpoint is given"):
        run_in_process([*small_world, "+checkpoint_options.rounds=2", f"run_dir={tmp_path / 'none'}"])


def test_a_checkpoint_for_modules_this_model_lacks_is_a_config_error(small_world, tmp_path):
    cfg = compose_config(small_world)
    checkpoint = editor_checkpoint(build_editor(cfg, build_experiment(cfg)), cfg)
    checkpoint["module_shapes"] = {"transformer.h.0.mlp.c_fc": [512, 128]}
    path = tmp_path / "editor.ckpt"
    torch.save(checkpoint, path)
    with pytest.raises(ConfigError, match=rf"checkpoint={path} was trained for modules .*transformer.h.0.mlp.c_fc"):
        run_in_process([*small_world, f"checkpoint={path}", f"run_dir={tmp_path / 'run'}"])


def wandb_records(path: Path):
    """The records of an offline run file (.wandb: a LevelDB-style log of protobuf records in 32 KiB blocks)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    position, pending, block = 7, b"", 32768
    while position + 7 <= len(data):
        if block - position % block < 7:  # a block's tail too short for a header is padding
            position += block - position % block
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + 7])
        chunk = data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 2):  # full, first
            pending = chunk
        elif kind in (3, 4):  # middle, last
            pending += chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def item_key(item) -> str:
    """A summary or history item's key: W&B stores it in `key` or, split, in `nested_key`."""
    return item.key or "/".join(item.nested_key)


def test_wandb_offline_run_holds_the_summary_metrics(small_world, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-dir"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_dir = tmp_path / "run"
    results = run_in_process([*small_world, "logger=wandb", f"run_dir={run_dir}"])

    (run_file,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    summary, history_keys = {}, set()
    for record in wandb_records(run_file):
        if record.WhichOneof("record_type") == "summary":
            summary.update({item_key(u): json.loads(u.value_json) for u in record.summary.update})
        elif record.WhichOneof("record_type") == "history":
            history_keys.update(item_key(item) for item in record.history.item)
    for name, value in results["metrics"].items():
        assert summary[f"final/{name}"] == pytest.approx(value), name
        assert summary[f"pre_edit/{name}"] == pytest.approx(results["pre_edit"][name]), name
    assert summary["timing/edit_seconds_per_step"] == pytest.approx(results["timing"]["edit_seconds_per_step"])
    assert {"edit/seconds", "update_norm/total", "eval/efficacy"} <= history_keys
    assert {"per_step/_type", "plot/filenames"} <= history_keys  # the per-step table and the plot


def test_saved_edited_model_reloads_with_the_same_efficacy_and_reverts_exactly(saving_run):
    cfg, results, saved = saving_run
    assert {EDITS_FILE, ORIGINALS_FILE, "config.json", "tokenizer.json"} <= {p.name for p in saved.iterdir()}
    assert not list(saved.parent.glob(".edited.partial-*"))

    experiment = build_experiment(cfg)  # the unedited model and the same evaluation records
    reloaded = AutoModelForCausalLM.from_pretrained(saved).eval()
    stream = [r for step in EditStream(experiment.data.eval, cfg.num_steps, cfg.edits_per_step, cfg.seed).steps
              for r in step]
    scores = RequestScorer(reloaded, 64).score(experiment.collator(stream)).summary()
    assert scores["efficacy"] == results["metrics"]["efficacy"]
    assert scores["generalization"] == results["metrics"]["generalization"]

    edited_weights = {k: v.clone() for k, v in reloaded.state_dict().items()}
    ledger = open_saved_edits(reloaded, saved)  # originals restored, edits replayed
    assert len(ledger) == cfg.num_steps
    assert all(torch.equal(v, edited_weights[k]) for k, v in reloaded.state_dict().items())

    revert_saved_edits(reloaded, saved)
    original = experiment.model.state_dict()
    assert all(torch.equal(v, original[k]) for k, v in reloaded.state_dict().items())
    batch = experiment.collator(stream).rephrase
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits,
                           experiment.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits)


def test_save_edited_refuses_an_existing_folder_and_leaves_nothing_half_written(small_world, tmp_path, monkeypatch):
    cfg = compose_config([*small_world, f"run_dir={tmp_path / 'run'}"])
    experiment = build_experiment(cfg)
    editor = build_editor(cfg, experiment)
    set_up_editor(cfg, experiment, editor)
    session = EditSession(experiment.model, experiment.editable, editor)
    session.edit(experiment.collator(experiment.data.eval[:2]).edit)
    (tmp_path / "taken").mkdir()
    with pytest.raises(ConfigError, match="taken already exists"):
        save_edited_model(session, experiment.loaded.tokenizer, tmp_path / "taken")

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(experiment.loaded.tokenizer, "save_pretrained", fail)
    with pytest.raises(OSError, match="disk full"):
        save_edited_model(session, experiment.loaded.tokenizer, tmp_path / "edited")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]
    assert len(session.ledger) == 1


def test_heldout_text_file_is_read_line_by_line_and_a_missing_one_is_named(small_world, tmp_path):
    text = tmp_path / "heldout.txt"
    text.write_text("Alpha lives in\n\n  the city of  \nAlpha\n", encoding="utf-8")
    cfg = compose_config([*small_world, f"heldout_text_file={text}"])
    experiment = build_experiment(cfg)
    rows = heldout_rows(cfg, experiment)
    expected = experiment.loaded.tokenizer(["Alpha lives in", "the city of", "Alpha"])["input_ids"]
    assert [ids[mask.bool()].tolist() for ids, mask in zip(rows.input_ids, rows.attention_mask)] == expected
    assert rows.labels[0, 0] == rows.input_ids[0, 0] and (rows.labels[2, 2:] == -100).all()
    assert heldout_rows(compose_config(small_world), experiment).input_ids.shape[0] == \
        len(experiment.data.heldout_text)
    with pytest.raises(ConfigError, match="nowhere.txt: no such file"):
        heldout_rows(compose_config([*small_world, f"heldout_text_file={tmp_path / 'nowhere.txt'}"]), experiment)
    first_two = heldout_rows(compose_config([*small_world, f"heldout_text_file={text}", "heldout_text_limit=2"]),
                             experiment)
    assert torch.equal(first_two.input_ids, rows.input_ids[:2, :first_two.input_ids.shape[1]])
    with pytest.raises(ConfigError, match="heldout_text_limit=0"):
        heldout_rows(compose_config([*small_world, "heldout_text_limit=0"]), experiment)


def test_a_batch_size_sweep_edits_equal_totals_and_collects_into_one_table_and_plot(small_world, tmp_path):
    from rledit.evaluation import sweep

    for editor, per_step, options in (("training_free", 2, []), ("training_free", 6, []),
                                      ("memit", 6, ["editor.build.z_steps=2"])):
        run_in_process([*small_world, f"editor={editor}", f"edits_per_step={per_step}", "total_edits=12",
                        "metrics.generation=false", f"stats.cache_dir={tmp_path / 'cache'}", *options,
                        f"run_dir={tmp_path / 'sweep' / f'{editor}-{per_step}'}"])
    sweep.main([str(tmp_path / "sweep"), "--out", str(tmp_path / "table")])
    with (tmp_path / "table" / "comparison.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [(r["editor"], r["num_steps"], r["edits_per_step"]) for r in rows] == \
        [("memit", "2", "6"), ("training_free", "6", "2"), ("training_free", "2", "6")]
    assert all(r["num_requests"] == "12" for r in rows)
    assert matplotlib.image.imread(tmp_path / "table" / "comparison.png").shape[1] > 1000
    with pytest.raises(ConfigError, match="total_edits=12 is not a multiple of edits_per_step=5"):
        run_in_process([*small_world, "edits_per_step=5", "total_edits=12", f"run_dir={tmp_path / 'bad'}"])
