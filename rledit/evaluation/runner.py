"""The lifelong protocol: edit a stream of request batches one after another into the same model, and measure.

Time per edit step covers the editor's prediction and the commit only (synchronized on CUDA);
evaluation, norms and collation happen outside the timed region.
"""

from __future__ import annotations

import resource
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch
from tqdm.auto import tqdm

from rledit.data.collate import EditBatch, EditCollator, TokenizedBatch
from rledit.data.records import EditRecord
from rledit.data.streams import EditStream
from rledit.errors import ConfigError, EditRefusedError
from rledit.evaluation.progress import RunProgress, RunState
from rledit.evaluation.scoring import RequestScorer, RequestScores, heldout_perplexity, model_device
from rledit.session import EditSession

EVAL_TIMINGS = ("final", "immediate", "curve")


@dataclass(frozen=True)
class Protocol:
    """Sequential-batch editing of num_steps x edits_per_step requests, and when they are evaluated.

    `final`: every request on the final model (the lifelong number papers report); `immediate`: each
    batch right after its own edit; `curve`: all requests so far every `curve_every` steps and at the end.
    """

    num_steps: int
    edits_per_step: int
    eval_timing: str = "final"
    curve_every: int = 1
    seed: int = 0
    eval_batch_size: int = 32

    def __post_init__(self):
        if self.eval_timing not in EVAL_TIMINGS:
            raise ConfigError(f"eval_timing={self.eval_timing!r}: expected one of {', '.join(EVAL_TIMINGS)}")
        if self.num_steps < 1 or self.edits_per_step < 1:
            raise ConfigError(f"num_steps={self.num_steps} and edits_per_step={self.edits_per_step} must be >= 1")
        if self.curve_every < 1:
            raise ConfigError(f"curve_every must be >= 1, got {self.curve_every}")
        if self.eval_batch_size < 1:
            raise ConfigError(f"eval_batch_size must be >= 1, got {self.eval_batch_size}")

    def evaluates_after(self, step: int) -> bool:
        """Whether metrics are measured after (1-based) `step` in this protocol."""
        if self.eval_timing == "immediate":
            return True
        if self.eval_timing == "curve":
            return step % self.curve_every == 0 or step == self.num_steps
        return False


@dataclass
class StepRecord:
    """What one edit step did: its cost, whether it was refused, the cumulative update norms, and any metrics."""

    step: int
    edits: int
    edit_seconds: float
    refused: bool
    update_norms: dict[str, float]
    metrics: dict[str, float | None] = field(default_factory=dict)

    @property
    def total_update_norm(self) -> float:
        return sum(v * v for v in self.update_norms.values()) ** 0.5

    def as_dict(self) -> dict:
        return {**asdict(self), "total_update_norm": self.total_update_norm}


@dataclass
class LifelongResult:
    protocol: Protocol
    num_requests: int
    pre_edit: dict[str, float | None]
    metrics: dict[str, float | None]
    per_step: list[StepRecord]
    peak_memory_bytes: int
    peak_memory_source: str
    refused_edits: int

    @property
    def edit_seconds_total(self) -> float:
        return sum(s.edit_seconds for s in self.per_step)

    @property
    def edit_seconds_per_step(self) -> float:
        return self.edit_seconds_total / len(self.per_step)


def run_lifelong(session: EditSession, collator: EditCollator, records: Sequence[EditRecord], protocol: Protocol,
                 heldout: TokenizedBatch | None = None, scorer: RequestScorer | None = None,
                 progress: RunProgress | None = None) -> LifelongResult:
    """Run `protocol` on a stream drawn from `records` with `session`'s editor; the session keeps the edits.

    `heldout` rows (see `scoring.text_rows`) add perplexity wherever metrics are measured. The default
    scorer measures every metric the collator allows, `protocol.eval_batch_size` rows at a time. With
    `progress`, the run saves its state every `progress.every` steps and first continues from a save there.
    """
    model = session.model
    model.eval()
    scorer = scorer or RequestScorer(model, protocol.eval_batch_size, collator)
    device = model_device(model)
    steps = EditStream(records, protocol.num_steps, protocol.edits_per_step, protocol.seed).steps
    stream = [r for step in steps for r in step]
    batches = [collator(step) for step in steps]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def with_perplexity(summary: dict[str, float | None], state: str) -> dict[str, float | None]:
        if heldout is not None:
            summary["perplexity"] = heldout_perplexity(model, heldout, protocol.eval_batch_size,
                                                       f"held-out perplexity of the {state} model")
        return summary

    everything = collator(stream)
    run = progress.resume(session) if progress is not None else None
    if run is None:
        pre = scorer.score(everything, phase="scoring the unedited model")
        pre_edit = pre.summary()
        pre_edit["specificity_agreement"] = None if pre_edit["specificity"] is None else 1.0  # agrees with itself
        run = RunState(with_perplexity(pre_edit, "unedited"), pre.locality_predictions)
    else:
        print(f"continuing from the progress saved after step {run.steps_done} of {len(batches)} in {progress.folder}")
    reference = run.reference
    for index in tqdm(range(run.steps_done, len(batches)), desc=f"editing {len(stream)} requests", unit="step",
                      initial=run.steps_done, total=len(batches)):
        batch, step, edits = batches[index], index + 1, (index + 1) * protocol.edits_per_step
        seconds, accepted = _timed_edit(session, batch.to(device), device)
        run.refused += not accepted
        record = StepRecord(step, edits, seconds, not accepted, session.ledger.cumulative_norms())
        if protocol.eval_timing == "immediate":
            run.immediate_parts.append(scorer.score(batch, reference[edits - protocol.edits_per_step:edits]))
            record.metrics = run.immediate_parts[-1].summary()
        elif protocol.evaluates_after(step):
            scores = scorer.score(collator(stream[:edits]), reference[:edits], phase=f"scoring after step {step}")
            record.metrics = with_perplexity(scores.summary(), f"step-{step}")
        run.per_step.append(record)
        if progress is not None and progress.due(step):
            progress.save(session, run)

    if protocol.eval_timing == "final":
        metrics = with_perplexity(scorer.score(everything, reference, phase="scoring the final model").summary(),
                                  "final")
    elif protocol.eval_timing == "immediate":
        metrics = with_perplexity(RequestScores.concat(run.immediate_parts).summary(), "final")
    else:
        metrics = run.per_step[-1].metrics
    memory, source = _peak_memory(device)
    return LifelongResult(protocol, len(stream), run.pre_edit, metrics, run.per_step, memory, source, run.refused)


def validation_scores(session: EditSession, batches: Sequence[EditBatch], chunk_rows: int = 64,
                      collator: EditCollator | None = None) -> dict[str, float]:
    """Commit `batches` in order, score efficacy, generalization, specificity and agreement with the model
    as it was before (as the lifelong evaluation does) of all of them on the final model, then revert: the
    model's weights and the editor's state (normalizer statistics) are restored exactly, so validation leaves
    no trace on training. With `collator`, CounterFact's comparisons too, for the requests with a
    target_true. Refused batches are counted in `refused_edits`.
    """
    model, editor = session.model, session.editor
    scorer = RequestScorer(model, chunk_rows, collator, generation=False)
    unedited = RequestScorer(model, chunk_rows, generation=False)
    reference = [unedited.score(batch).locality_predictions for batch in batches]
    editor_state = editor.snapshot()
    committed_before = len(session.ledger)
    refused = 0
    try:
        for batch in batches:
            refused += not _edit_or_refuse(session, batch.edit)
        summary = RequestScores.concat([scorer.score(batch, before)
                                        for batch, before in zip(batches, reference)]).summary()
    finally:
        session.revert(len(session.ledger) - committed_before)
        editor.restore(editor_state)
    return {**{k: v for k, v in summary.items() if v is not None}, "refused_edits": float(refused)}


def _timed_edit(session: EditSession, batch: EditBatch, device: torch.device) -> tuple[float, bool]:
    """Seconds the editor takes to predict and commit one batch, and whether the step was accepted."""
    _synchronize(device)
    started = time.perf_counter()
    accepted = _edit_or_refuse(session, batch.edit)
    _synchronize(device)
    return time.perf_counter() - started, accepted


def _edit_or_refuse(session: EditSession, batch: TokenizedBatch) -> bool:
    """Edit `batch` into the session's model; False if the step was refused (and so left no trace)."""
    try:
        session.edit(batch)
    except EditRefusedError:
        return False
    return True


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_memory(device: torch.device) -> tuple[int, str]:
    """Peak memory of the run: CUDA max allocated on a GPU, else the process's peak resident set (Linux: KiB)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "cuda_max_memory_allocated"
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024, "process_peak_rss"
