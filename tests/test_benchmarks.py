"""The benchmark scripts measure what they say: edits are undone between rounds, batches are labelled like
EditCollator's, memory probes count allocations exactly, and the GPU script's CPU smoke test runs."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import locate_step
from edit_step import PHASES, measure, timed_end_to_end, timed_floor, timed_phases
from first_batch_calibration import module_means, seeds
from gpu_llama import Size, build_session, random_edit_batch
from harness import peak_bytes_of
from kernel_sensitivity import compare, record
from key_memory import RecomputingKeyMemory, edit_step
from key_overlap import kept_share, nearest_cosine
from nullspace_capacity import capacity
from world_keys import transfers

from rledit.data.collate import IGNORE_INDEX, EditCollator
from rledit.data.text import SampledText
from rledit.editors.base import EditContext
from rledit.editors.key_memory import KeyMemory
from rledit.editors.locate import _reading
from rledit.editors.memit import MemitEditor
from rledit.editors.ridge import RidgeEditor
from rledit.editors.training_free import TrainingFreeEditor
from rledit.models.layers import resolve_edit_modules
from rledit.models.statistics import PreservedStatistics
from rledit.session import EditSession

CPU = torch.device("cpu")
MICRO = Size(LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64),
             edit_modules=["model.layers.0.mlp.gate_proj", "model.layers.1.mlp.up_proj"],
             edits=3, prompt_tokens=6, target_tokens=2)


@pytest.fixture(scope="module")
def session_and_batch():
    torch.manual_seed(0)
    session = build_session(MICRO, CPU)
    generator = torch.Generator().manual_seed(0)
    history, batch = (random_edit_batch(MICRO.edits, MICRO.prompt_tokens, MICRO.target_tokens,
                                        MICRO.config.vocab_size, CPU, generator) for _ in range(2))
    return session, batch, history


def test_random_batch_marks_the_positions_that_predict_target_tokens(session_and_batch):
    _, batch, _ = session_and_batch
    predicts_target = batch.labels[:, 1:] != IGNORE_INDEX
    assert torch.equal(batch.target_mask[:, :-1], predicts_target)
    assert not batch.target_mask[:, -1].any()
    assert int(batch.target_mask.sum()) == MICRO.edits * MICRO.target_tokens


def test_measure_reverts_every_edit_and_records_every_round(session_and_batch):
    session, batch, history = session_and_batch
    before = {name: em.module.weight.detach().clone() for name, em in session.editable.items()}
    result = measure(session, batch, history, repeats=2, warm_up=1, device=CPU)

    assert len(session.ledger) == 0
    for name, em in session.editable.items():
        assert torch.equal(em.module.weight, before[name]), name
    assert all(len(result.phases[phase]) == 2 for phase in PHASES)
    assert len(result.floor) == len(result.end_to_end) == 2
    assert result.captured_tokens == MICRO.edits * MICRO.target_tokens
    assert all(seconds > 0 for seconds in result.totals + result.floor)


def test_a_timed_edit_is_undone_in_the_ledger_and_in_the_editors_key_memory(session_and_batch):
    session, batch, history = session_and_batch
    session.edit(history)
    try:
        timed_phases(session, batch, CPU)
        timed_end_to_end(session, batch, CPU)
        assert len(session.ledger) == 1
        assert len(session.editor.key_memory.steps) == 1  # only the history edit is remembered
    finally:
        session.revert()


def test_floor_leaves_the_model_frozen(session_and_batch):
    session, batch, _ = session_and_batch
    assert timed_floor(session.model, session.editable, batch, CPU) > 0
    assert not any(p.requires_grad or p.grad is not None for p in session.model.parameters())


def test_live_tensor_memory_counts_a_temporary_alive_together_with_its_input():
    # ones(1000) and the sum are both alive at once: 2 x 4000 bytes, whatever else the process holds.
    peak, how = peak_bytes_of(lambda: torch.ones(1000) + 1, CPU)
    assert (peak, how) == (8000, "live tensor bytes")


def test_gpu_script_runs_at_small_size_on_cpu():
    done = subprocess.run([sys.executable, str(BENCHMARKS / "gpu_llama.py"), "--small", "--device", "cpu",
                           "--threads", "1", "--repeats", "1", "--edits", "2"],
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    ratio = re.search(r"edit step / floor = \*\*([0-9.]+)x\*\*", done.stdout)
    assert ratio and float(ratio.group(1)) > 0, done.stdout
    assert re.search(r"\| fused kernel \(torch\), 256x896, N=8 \| [0-9.]+ ms", done.stdout), done.stdout


def test_the_key_memory_benchmark_times_two_memories_that_hand_the_solve_the_same_regularisers():
    generator = torch.Generator().manual_seed(0)
    running, recomputing = KeyMemory(0.5), RecomputingKeyMemory(0.5)
    for _ in range(2):  # the second step solves against the first one's committed keys
        keys = [[torch.randn(3, 8, generator=generator) for _ in range(2)] for _ in range(4)]
        (_, new), (_, old) = edit_step(running, keys), edit_step(recomputing, keys)
        for a, b in zip(new, old, strict=True):
            torch.testing.assert_close(a, b)
    for name in ("0", "1"):
        torch.testing.assert_close(running.gram[name], recomputing.gram[name])


def test_null_space_capacity_counts_what_new_keys_add_to_the_earlier_ones():
    fresh = torch.eye(6, dtype=torch.float64)  # every key a new direction
    assert [(n, round(share, 6), rank) for n, share, rank in capacity(fresh, 2)] == [(2, 1.0, 2), (4, 1.0, 4),
                                                                                      (6, 1.0, 6)]
    repeated = torch.cat([fresh[:2], fresh[:2] * 3.0, (fresh[0] + fresh[2])[None], fresh[3:4]])
    rows = capacity(repeated, 2)
    assert rows[1][1] == pytest.approx(0.0, abs=1e-9) and rows[1][2] == 2  # the same two directions again
    assert rows[2][1] == pytest.approx((0.5 ** 0.5 + 1.0) / 2)  # of e0 + e2 only e2 is new (1/sqrt 2 of its norm), all of e3


def test_key_overlap_compares_each_key_with_its_own_requests_keys_only():
    keys = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    queries = torch.tensor([[1.0, 1.0], [0.0, 2.0]], dtype=torch.float64)
    # query 0 belongs to request 0 (key e0: cos 1/sqrt 2), query 1 to request 1 (key e1: cos 1)
    assert nearest_cosine(queries, torch.tensor([0, 1]), keys, torch.tensor([0, 1])) == pytest.approx(
        (0.5 ** 0.5 + 1.0) / 2)
    assert kept_share(queries, torch.diag(torch.tensor([1.0, 0.0], dtype=torch.float64))) == pytest.approx(
        (0.5 ** 0.5 + 0.0) / 2)


def test_world_keys_transfer_is_the_share_of_an_update_solved_against_C():
    keys = torch.tensor([[1.0, 0.0], [1.0, 1.0]], dtype=torch.float64)
    C = torch.diag(torch.tensor([1.0, 4.0], dtype=torch.float64))
    paraphrase, others = transfers(keys, 2 * keys, C)
    assert paraphrase == pytest.approx(2.0)  # twice the key: twice the move
    # C^-1 k0 = (1, 0), k0^T C^-1 k0 = 1; C^-1 k1 = (1, 1/4), k1^T C^-1 k1 = 5/4
    assert others.tolist() == pytest.approx([1.0 / 1.25, 1.0])  # [key 0 from key 1's update, key 1 from key 0's]
    assert transfers(torch.eye(3, dtype=torch.float64), torch.eye(3, dtype=torch.float64),
                     torch.eye(3, dtype=torch.float64))[1].abs().max() == 0.0  # orthogonal keys: nothing spills


def test_locate_step_splits_the_edit_step_and_puts_the_editors_methods_back(small_world_model, small_edit_requests,
                                                                            tmp_path):
    model, tokenizer = small_world_model.model, small_world_model.tokenizer
    modules = {name: em.module for name, em in resolve_edit_modules(model, "model.layers.{0-1}.mlp.down_proj").items()}
    editor = MemitEditor({name: tuple(m.weight.shape) for name, m in modules.items()}, z_steps=2, num_prefixes=1)
    editor.setup(EditContext(model, tokenizer, modules, PreservedStatistics(
        SampledText(num_texts=16, length=12), num_tokens=200, cache_dir=str(tmp_path), progress=False)))
    batch = EditCollator(tokenizer)(small_edit_requests[:3]).edit
    seconds = locate_step.time_step(editor, model, modules, batch)
    assert all(seconds[phase] > 0 for phase in locate_step.PHASES)
    assert sum(seconds[phase] for phase in locate_step.PHASES) <= seconds["total"]
    assert not set(locate_step.PHASES.values()) & set(vars(editor))  # the class's methods again
    assert locate_step.time_one_at_a_time(editor, model, EditCollator(tokenizer), small_edit_requests[:2]) > 0


def test_the_published_z_optimisation_reaches_the_editors_target_values(small_world_model, small_edit_requests,
                                                                         tmp_path):
    """The published procedure (whole rows through the whole model, delta written by a hook) and the editor's
    (suffix passes through the blocks above) optimise the same objective: the same z for one request."""
    model, tokenizer = small_world_model.model, small_world_model.tokenizer
    modules = {name: em.module for name, em in resolve_edit_modules(model, "model.layers.{0-1}.mlp.down_proj").items()}
    editor = MemitEditor({name: tuple(m.weight.shape) for name, m in modules.items()}, z_steps=4, num_prefixes=2,
                         early_stop_nll=0.0)
    editor.setup(EditContext(model, tokenizer, modules, PreservedStatistics(
        SampledText(num_texts=16, length=12), num_tokens=200, cache_dir=str(tmp_path), progress=False)))
    batch = EditCollator(tokenizer)(small_edit_requests[:1]).edit
    ours = editor._target_values(model, editor._prompt_rows(batch), editor._kl_rows(batch), 1)[0]
    published = locate_step.published_z(editor, model, batch)
    bare = editor._prompt_rows(batch)
    with torch.no_grad(), _reading(model.get_submodule(editor.z_block), torch.arange(1), bare.subject_last[:1]) as read:
        model.base_model(input_ids=bare.input_ids[:1], attention_mask=bare.attention_mask[:1])
    moved = float((ours - read[0][0]).norm())
    assert moved > 0.1 * float(ours.norm())  # four Adam steps moved z, and both by the same
    assert float((published - ours).norm()) < 1e-3 * moved


def test_first_batch_calibration_averages_each_modules_calibrated_values():
    editor = RidgeEditor({"a": (3, 4), "b": (3, 4), "c": (5, 2)}, rank=2)
    for name, eta, ridge in (("a", -6.0, 1.0), ("b", -5.0, 2.0), ("c", -4.0, 6.0)):
        editor.bank.calibrate_log_eta(name, eta)
        editor.bank.calibrate_log_lambda(name, ridge)
    assert module_means(editor.state_dict()) == pytest.approx((-5.0, 3.0))
    assert seeds("0-6") == list(range(7)) and seeds("3") == [3]


def test_kernel_sensitivity_records_every_round_and_compares_a_run_with_itself_as_equal(ridge_edit_setup):
    model, editable, shapes, batches = ridge_edit_setup
    session = EditSession(model, editable, TrainingFreeEditor(shapes, rounds=2, init_shift=0.3))
    try:
        run = record(session, batches)
    finally:
        session.revert()
    assert len(run["steps"]) == len(batches)
    assert all(len(step["rounds"]) == session.editor.rounds for step in run["steps"])
    assert all(float(u.norm()) > 0 for u in run["steps"][-1]["update"].values())
    assert all(r == 0.0 for rounds, update in compare(run, run) for r in [*rounds, update])
    other = {"steps": [{**step, "update": {k: 2 * u for k, u in step["update"].items()}} for step in run["steps"]]}
    assert compare(other, run)[-1][1] == pytest.approx(1.0)  # twice the update: a relative difference of 1
