"""The Lightning module that trains an editor: one training item is one edit sequence.

Manual optimization: `rollout` accumulates the sequence's policy gradient into the editor, then the
module clips and steps (every `step_every` steps of the sequence, or once at its end). The LLM is held
outside the module's children, so checkpoints carry the editor and never the LLM's weights.

Under DDP every process rolls its own sequences and the processes stay identical by syncing explicitly
once per optimizer step: gradients are averaged, a step is skipped everywhere if any process saw a
non-finite sequence, and the normalizers' statistics are pooled. DistributedDataParallel's reducer takes
no part: the two-stage backward runs many backward passes per step inside `training_step`, and
Lightning never arms the reducer under manual optimization (it clears `require_backward_grad_sync`
before DDP's post-forward, so `prepare_for_backward` never runs and its gradient hooks stay idle).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import lightning as L
import torch
import torch.distributed as dist
from torch import nn

from rledit.data.collate import EditBatch
from rledit.editing.ledger import UpdateLedger
from rledit.editing.update import non_finite
from rledit.editors.base import Editor
from rledit.editors.normalizer import RunningNormalizer
from rledit.errors import ConfigError, EditRefusedError
from rledit.evaluation.runner import validation_scores
from rledit.evaluation.scoring import CF_SCORES
from rledit.models.layers import EditableModule
from rledit.session import EditSession
from rledit.training.rollout import Objective, RolloutStats, rollout


@dataclass
class FrozenTarget:
    """The LLM and its edited modules; a plain object so Lightning never treats the LLM as a child."""

    model: nn.Module
    editable: dict[str, EditableModule]

    @property
    def modules(self) -> dict[str, nn.Module]:
        return {name: em.module for name, em in self.editable.items()}

    @cached_property
    def ledger(self) -> UpdateLedger:
        """One ledger for all rollouts: each leaves it empty, so its copy of the originals is made once."""
        return UpdateLedger({name: em.weight_view() for name, em in self.editable.items()})


# What `training.val_score` may average. Agreement with the unedited model, not true-answer specificity, is
# the default's locality term: on CounterFact the unedited model's specificity is about 0.1, so a score with it
# could not see an editor that breaks the rest of the model.
VALIDATION_METRICS = ("efficacy", "generalization", "specificity", "specificity_agreement", *CF_SCORES)
TOKEN_SCORE = ("efficacy", "generalization", "specificity_agreement")


def validation_score(scores: dict[str, float], names: Sequence[str]) -> float:
    """The mean of the `names` metrics of `scores`; a ConfigError names those no validation request defined."""
    missing = [name for name in names if name not in scores]
    if missing:
        raise ConfigError(f"training.val_score: no validation request defines {', '.join(missing)} (CounterFact's "
                          f"comparisons need records with a target_true)")
    return sum(scores[name] for name in names) / len(names)


@dataclass
class StartingEditor:
    """The editor's state before any optimizer step, and its validation score."""

    score: float
    state: dict[str, torch.Tensor]


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class StatisticsPooling:
    """Keeps normalizer statistics identical across processes without losing any process's observations.

    Each process observes the rows of its own sequences. At `pool()` every process's new rows since the
    last pooling are merged exactly (parallel mean/variance), so all processes then hold the statistics
    of every row any of them observed, as one process that rolled all the sequences would. Broadcasting
    rank 0's buffers instead would also keep them equal, but would throw the other ranks' rows away.
    """

    def __init__(self, normalizers: list[RunningNormalizer]):
        self.normalizers = normalizers
        self.mark()

    def mark(self) -> None:
        """Remember the current (common) statistics; `pool()` merges what was observed after this."""
        self.since = [(n.count.to(torch.float64), n.mean.clone(), n.m2.clone()) for n in self.normalizers]

    @torch.no_grad()
    def pool(self) -> None:
        for norm, (n0, mean0, m2_0) in zip(self.normalizers, self.since):
            # this process's new rows: invert the merge of (n0, mean0, m2_0) with them
            n = norm.count.to(torch.float64)
            n_new = n - n0
            mean_new = (n * norm.mean - n0 * mean0) / n_new.clamp_min(1.0)
            m2_new = norm.m2 - m2_0 - (mean_new - mean0).square() * (n0 * n_new / n.clamp_min(1.0))
            # all processes' new rows, pooled
            sums = torch.cat([n_new.reshape(1), n_new * mean_new])
            dist.all_reduce(sums)
            n_all, mean_all = sums[0], sums[1:] / sums[0].clamp_min(1.0)
            m2_all = m2_new + n_new * (mean_new - mean_all).square()
            dist.all_reduce(m2_all)
            # merged into the common statistics
            norm.count.copy_(n0.round().to(torch.int64))
            norm.mean.copy_(mean0)
            norm.m2.copy_(m2_0)
            norm.merge(n_all, mean_all, m2_all)
        self.mark()


class EditorTrainer(L.LightningModule):
    """Trains `editor` on sequences of edit batches with the given objective."""

    def __init__(self, editor: Editor, target: FrozenTarget, objective: Objective, lr: float = 1e-4,
                 grad_clip: float | None = 1.0, step_every: int | None = None,
                 val_score: Sequence[str] = TOKEN_SCORE):
        super().__init__()
        val_score = [val_score] if isinstance(val_score, str) else list(val_score)
        unknown = [name for name in val_score if name not in VALIDATION_METRICS]
        if unknown or not val_score:
            raise ConfigError(f"training.val_score={list(val_score)}: expected some of "
                              f"{', '.join(VALIDATION_METRICS)}")
        self.val_score = tuple(val_score)
        self.compares_counterfact = any(name in CF_SCORES for name in self.val_score)  # costs a second scoring pass
        self.automatic_optimization = False
        self.editor = editor
        self.target = target
        self.objective = objective
        self.lr, self.grad_clip, self.step_every = lr, grad_clip, step_every
        self.skipped_steps = 0
        self.pooling: StatisticsPooling | None = None  # set at fit start when there are several processes
        self.kept_statistics: dict[str, torch.Tensor] = {}  # editor buffers as of the last optimizer step
        self.start: StartingEditor | None = None  # the editor before training, if validated (remember_start)

    def configure_optimizers(self):
        return torch.optim.Adam([p for p in self.editor.parameters() if p.requires_grad], lr=self.lr)

    def setup(self, stage: str) -> None:
        self.target.model.to(self.device)

    def calibrate(self) -> None:
        """Calibrate step sizes on the first usable batch of one fixed training sequence, so every process
        starts from the same editor; a batch whose factors give no usable step size is passed over. In train
        mode whichever hook calls it (validation runs in eval mode), so the normalizers observe that batch."""
        if not self.editor.needs_calibration:
            return
        mode = self.editor.training
        self.editor.train()
        try:
            refusals = []
            for batch in self.trainer.datamodule.train_sequences[0]:
                try:
                    with torch.no_grad():
                        self.editor.predict_update(self.target.model, self.target.modules, batch.to(self.device).edit)
                    break
                except EditRefusedError as exc:
                    refusals.append(str(exc))
            else:
                raise EditRefusedError("no batch of the first training sequence calibrates the editor: "
                                       + "; ".join(refusals))
        finally:
            self.editor.train(mode)

    def remember_start(self, score: float) -> None:
        """Hold the starting (untrained) editor and its validation score: `training.keep=best` keeps it when
        no epoch of training beats it. Checkpointed, so a resumed run knows it too."""
        self.start = StartingEditor(score, {k: v.detach().clone() for k, v in self.editor.state_dict().items()})

    def on_validation_start(self) -> None:
        self.calibrate()  # the starting editor is validated before fit: calibrated as training would

    def on_fit_start(self) -> None:
        self.calibrate()
        if _world_size() > 1:  # DDP: each process observes its own rows (see StatisticsPooling)
            normalizers = [m for m in self.editor.modules() if isinstance(m, RunningNormalizer)]
            self.pooling = StatisticsPooling(normalizers)
        self._keep_statistics()

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["skipped_steps"] = self.skipped_steps
        if self.start is not None:
            checkpoint["starting_editor"] = {"score": self.start.score, "state": self.start.state}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.skipped_steps = checkpoint.get("skipped_steps", 0)
        start = checkpoint.get("starting_editor")
        self.start = StartingEditor(start["score"], start["state"]) if start is not None else None

    def training_step(self, sequence: list[EditBatch], batch_idx: int) -> None:
        optimizer = self.optimizers()
        steps = [batch.to(self.device) for batch in sequence]
        started = time.perf_counter()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

        def maybe_step(t: int) -> None:
            if self.step_every and (t + 1) % self.step_every == 0 and t + 1 < len(steps):
                self._optimizer_step(optimizer, finite=True)

        self.editor.train()
        try:
            stats = rollout(self.editor, self.target.model, self.target.modules, self.target.ledger, steps,
                            self.objective, on_step=maybe_step)
        except EditRefusedError:  # a non-finite update met the ledger; the rollout has restored the weights
            stats = RolloutStats(finite=False)
        grad_norm = self._optimizer_step(optimizer, finite=stats.finite)
        metrics = {"train/return": stats.ret, "train/gen_loss": stats.gen_loss, "train/loc_loss": stats.loc_loss,
                   "train/update_norm_sq": stats.norm_sq, "train/grad_norm": grad_norm,
                   "train/seconds_per_step": (time.perf_counter() - started) / len(steps),
                   "train/skipped_steps": float(self.skipped_steps)}
        metrics.update({f"update_norm/{name}": value for name, value in stats.update_norms.items()})
        if self.device.type == "cuda":
            metrics["train/peak_memory_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        self.log_dict(metrics, prog_bar=False, on_step=True, batch_size=1)
        self.log("return", stats.ret, prog_bar=True, logger=False, batch_size=1)

    def _optimizer_step(self, optimizer, finite: bool) -> float:
        """Sync the processes, clip, step; a non-finite sequence (on any process) is skipped untouched.

        A process whose sequence was non-finite (a non-finite loss, gradient or update) also drops what its
        normalizers observed since the last step, before pooling: non-finite factors would otherwise poison
        the statistics, and with them every later sequence.
        """
        params = [p for p in self.editor.parameters() if p.requires_grad]
        finite = finite and not non_finite({str(i): p.grad for i, p in enumerate(params) if p.grad is not None})
        if not finite:
            self._restore_statistics()
        if self.pooling is not None:
            finite = self._sync_processes(params, finite)
        grads = [p.grad for p in params if p.grad is not None]
        norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))) \
            if grads else 0.0
        if finite and torch.isfinite(torch.tensor(norm)):
            if self.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, self.grad_clip)
            optimizer.step()
        else:
            self.skipped_steps += 1
        optimizer.zero_grad(set_to_none=True)
        self._keep_statistics()
        return norm

    def _keep_statistics(self) -> None:
        self.kept_statistics = {name: b.detach().clone() for name, b in self.editor.named_buffers()}

    @torch.no_grad()
    def _restore_statistics(self) -> None:
        for name, buffer in self.editor.named_buffers():
            buffer.copy_(self.kept_statistics[name])

    def _sync_processes(self, params: list[nn.Parameter], finite: bool) -> bool:
        """Average gradients, pool normalizer statistics; returns whether every process's sequence was finite."""
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
            p.grad /= _world_size()
        self.pooling.pool()
        flag = torch.tensor(float(finite), device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag)

    def validation_step(self, sequence: list[EditBatch], batch_idx: int) -> None:
        """Lifelong editing of one held-out sequence with the current editor, scored, then reverted.

        `val/score`, the mean of the `val_score` metrics (Lightning averages each over the validation
        sequences), is what `training.keep=best` selects the editor by.
        """
        self.editor.eval()
        session = EditSession(self.target.model, self.target.editable, self.editor)
        collator = self.trainer.datamodule.eval_sequences.collator if self.compares_counterfact else None
        scores = validation_scores(session, [batch.to(self.device) for batch in sequence], collator=collator)
        scores["score"] = validation_score(scores, self.val_score)
        self.log_dict({f"val/{k}": v for k, v in scores.items()}, prog_bar=True, batch_size=1, sync_dist=True)
