"""The lifelong runner: protocols agree with each other, refusals and timing are handled, validation leaves no trace."""

from __future__ import annotations

import time

import pytest
import torch

from rledit.data.collate import EditCollator
from rledit.data.streams import EditStream
from rledit.editors.training_free import TrainingFreeEditor
from rledit.errors import ConfigError
from rledit.evaluation.plots import run_figure
from rledit.evaluation.runner import Protocol, run_lifelong, validation_scores
from rledit.evaluation.scoring import CF_SCORES, RequestScorer, text_rows
from rledit.models.layers import resolve_edit_modules
from rledit.session import EditSession
from rledit.threads import cpu_threads

EDIT_MODULES = "model.layers.{1-2}.mlp.{gate_proj,up_proj}"  # as configs/model/tiny.yaml


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These tiny models run several times faster on one thread than on a shared multi-core CPU."""
    with cpu_threads(1):
        yield


@pytest.fixture
def world_model(small_world_model, small_edit_requests):
    """The session's small world model (left exactly as found: every test reverts its edits)."""
    original = weights(small_world_model.model)
    yield small_world_model.world, small_world_model.tokenizer, small_world_model.model, small_edit_requests
    assert all(weights(small_world_model.model)[k].equal(v) for k, v in original.items())


def fresh_session(model, editor_class=TrainingFreeEditor, **options) -> EditSession:
    """A session with a new editor (editors keep normalizer statistics, so runs must not share one)."""
    editable = resolve_edit_modules(model, EDIT_MODULES)
    editor = editor_class({name: (em.d_out, em.d_in) for name, em in editable.items()}, **options)
    return EditSession(model, editable, editor)


def weights(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def test_protocol_rejects_bad_options_naming_them():
    with pytest.raises(ConfigError, match="eval_timing='sometimes'"):
        Protocol(2, 2, eval_timing="sometimes")
    with pytest.raises(ConfigError, match="num_steps=0"):
        Protocol(0, 2)
    with pytest.raises(ConfigError, match="curve_every"):
        Protocol(2, 2, eval_timing="curve", curve_every=0)


def test_final_curve_and_immediate_timings_agree_where_they_measure_the_same_thing(world_model):
    world, tokenizer, model, records = world_model
    collator = EditCollator(tokenizer)
    heldout = text_rows(tokenizer, world.heldout_sentences(10), None)

    def run(protocol: Protocol):
        session = fresh_session(model)
        result = run_lifelong(session, collator, records, protocol, heldout)
        session.revert()
        return result

    final, curve, immediate = (run(Protocol(5, 3, timing, curve_every=2, eval_batch_size=7))
                               for timing in ("final", "curve", "immediate"))
    assert final.pre_edit == curve.pre_edit == immediate.pre_edit
    assert final.pre_edit["specificity_agreement"] == 1.0
    assert final.metrics == curve.metrics  # the curve's last point is every request on the final model
    assert [s.step for s in curve.per_step if s.metrics] == [2, 4, 5]
    assert not any(s.metrics for s in final.per_step)
    # after the first step, "all requests so far" and "this batch right after its edit" are the same requests
    first = {k: v for k, v in run(Protocol(1, 3, "curve")).per_step[0].metrics.items() if k != "perplexity"}
    assert first == immediate.per_step[0].metrics
    # the same edits were made in every run, so the update norms match step for step
    for a, b in zip(final.per_step, immediate.per_step, strict=True):
        assert a.update_norms == pytest.approx(b.update_norms, rel=1e-6)
    assert final.per_step[-1].total_update_norm > final.per_step[0].total_update_norm > 0
    assert final.num_requests == 15 and final.refused_edits == 0
    assert final.peak_memory_bytes > 0 and final.peak_memory_source == "process_peak_rss"
    # the pretrained model knows the true facts (on any CPU: the fixture trains until it does), and the
    # editor moves it towards the new ones by a margin that rounding cannot erase. (Not token efficacy:
    # the new objects' first words are words the model already predicts, and with 15 requests that count
    # stayed at 0.333 under torch's portable kernels on an Intel Xeon while the comparisons below moved.)
    assert final.pre_edit["specificity"] > 0.9 and final.pre_edit["cf_efficacy_score"] < 0.2
    assert final.metrics["generation_exact_match"] >= final.pre_edit["generation_exact_match"] + 0.1
    assert final.metrics["cf_efficacy_score"] >= final.pre_edit["cf_efficacy_score"] + 0.3
    assert 0.0 <= final.metrics["specificity_agreement"] < 1.0
    # the final protocol's plot shows its two measurements as bars, the curve's as lines over the edits
    final_axes, curve_axes = (run_figure(r, "t").axes[0] for r in (final, curve))
    assert not final_axes.lines and len(final_axes.patches) == 2 * (len(final.metrics) - 1)  # perplexity apart
    assert final_axes.patches[len(final.metrics) - 1].get_height() == pytest.approx(final.metrics["efficacy"])
    assert {len(line.get_xdata()) for line in curve_axes.lines} == {4}  # unedited, after steps 2, 4, 5


class PoisonedEditor(TrainingFreeEditor):
    """The training-free editor, but its update of the second call is NaN (the ledger must refuse it)."""

    def __init__(self, module_shapes, **options):
        super().__init__(module_shapes, **options)
        self.calls = 0

    def update_from_factors(self, factors):
        update = super().update_from_factors(factors)
        self.calls += 1
        if self.calls == 2:
            for u in update.values():
                u.P = u.P * float("nan")
        return update


def test_refused_edits_are_counted_and_leave_the_model_as_it_was(world_model):
    _, tokenizer, model, records = world_model
    session = fresh_session(model, PoisonedEditor)
    result = run_lifelong(session, EditCollator(tokenizer), records, Protocol(3, 2))
    session.revert()
    assert result.refused_edits == 1
    assert [s.refused for s in result.per_step] == [False, True, False]
    assert result.per_step[1].update_norms == result.per_step[0].update_norms
    assert len(session.ledger) == 0


class SlowScorer(RequestScorer):
    def score(self, batch, reference=None, phase=None):
        time.sleep(1.0)
        return super().score(batch, reference, phase)


def test_edit_time_excludes_evaluation(world_model):
    _, tokenizer, model, records = world_model
    session = fresh_session(model)
    collator = EditCollator(tokenizer)
    started = time.perf_counter()
    result = run_lifelong(session, collator, records, Protocol(2, 2, "immediate"),
                          scorer=SlowScorer(model, 8, collator))
    session.revert()
    assert time.perf_counter() - started >= 3.0  # pre-edit + two immediate evaluations
    assert all(0 < s.edit_seconds < 1.0 for s in result.per_step)
    assert result.edit_seconds_total == pytest.approx(sum(s.edit_seconds for s in result.per_step))


def test_validation_scores_match_a_final_run_and_leave_model_and_editor_untouched(world_model):
    _, tokenizer, model, records = world_model
    collator = EditCollator(tokenizer)
    protocol = Protocol(3, 3, seed=5)
    reference_session = fresh_session(model)
    reference = run_lifelong(reference_session, collator, records, protocol)
    reference_session.revert()
    session = fresh_session(model)
    before_weights = weights(model)
    steps = EditStream(records, protocol.num_steps, protocol.edits_per_step, protocol.seed).steps
    editor_before = {k: v.clone() for k, v in session.editor.state_dict().items()}

    scores = validation_scores(session, [collator(step) for step in steps], chunk_rows=4, collator=collator)

    for key in ("efficacy", "generalization", "specificity", "specificity_agreement", *CF_SCORES):
        assert scores[key] == pytest.approx(reference.metrics[key])
    assert scores["specificity_agreement"] < 1.0  # the edits moved some locality answers: agreement can tell
    assert scores["refused_edits"] == 0.0
    assert all(weights(model)[k].equal(v) for k, v in before_weights.items())
    assert len(session.ledger) == 0
    after = session.editor.state_dict()
    assert all(after[k].equal(v) for k, v in editor_before.items())
    without_comparisons = validation_scores(session, [collator(step) for step in steps], chunk_rows=4)
    assert not set(CF_SCORES) & without_comparisons.keys()
    assert without_comparisons["efficacy"] == scores["efficacy"]


def test_the_printed_table_keeps_a_destroyed_models_perplexity_in_its_column():
    from rledit.evaluation.report import format_table
    from rledit.evaluation.runner import LifelongResult, StepRecord

    result = LifelongResult(Protocol(num_steps=1, edits_per_step=2), 2, {"efficacy": 0.05, "perplexity": 58.37},
                            {"efficacy": 0.0, "perplexity": 68069835.6},
                            [StepRecord(step=1, edits=2, edit_seconds=1.0, refused=False, update_norms={})], 0, "none", 0)
    perplexity = next(line for line in format_table(result, 0).splitlines() if line.startswith("perplexity"))
    assert perplexity.split() == ["perplexity", "58.37", "6.807e+07"]
