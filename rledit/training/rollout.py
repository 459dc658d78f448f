"""Policy-gradient rollout of one edit sequence (RLEdit), with the one-step objective as its T=1, k=1 case.

At step t the editor sees the committed weights W_{t-1} and batch E_t and acts with dW_t. The reward is
r_t = -[ sum_{j<k} mu^j (L_gen(E_{t-j}; W_{t-1}+dW_t) + c_loc L_loc(E_{t-j}; W_ref, W_{t-1}+dW_t))
        + eta ||dW_t||_F^2 ],
and the editor maximizes sum_t gamma^t r_t. The locality reference W_ref is W_{t-1} (the RLEdit paper:
the damage this step adds) or W_0 (`locality_reference="original"`: the damage of the whole sequence so far,
which is what a lifelong evaluation against the unedited model measures). Earlier weights are state: each dW_t is committed (detached)
before the next step, and the original weights are restored at the end.

Memory stays flat in k through a two-stage backward: the factors of dW_t are copied into leaves, every
LLM loss is back-propagated into those leaves one at a time (each graph freed at once), and the
accumulated leaf gradients go through the hypernetwork once per step. The rows a step scores (the
look-back batches' prompts) are stacked and sent through the LLM in chunks of bounded size.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from rledit.data.collate import IGNORE_INDEX, EditBatch, TokenizedBatch
from rledit.editing.functional import functional_update
from rledit.editing.ledger import UpdateLedger
from rledit.editing.losses import answer_log_probs, forward_logits, weighted_locality_kl, weighted_target_nll
from rledit.editing.update import FactoredUpdate, ModuleUpdate
from rledit.editors.base import Editor
from rledit.errors import ConfigError

GEN_PROMPTS = ("edit", "rephrase")
LOCALITY_REFERENCES = ("previous", "original")
LOOK_BACKS = ("recent", "spread")
LOCALITY_BATCHES = ("look_back", "current")
GOLDEN_FRACTION = (math.sqrt(5.0) - 1.0) / 2.0


@dataclass(frozen=True)
class Objective:
    """Length of a training sequence and the weights of its sequence-level reward (the RLEdit paper)."""

    sequence_length: int = 50     # T: edit steps per training sequence
    back_depth: int = 10          # k: how many recent batches each step's reward looks back at
    decay: float = 0.95           # mu: weight of the batch j steps back
    discount: float = 1.0         # gamma: weight of step t in the return
    locality_weight: float = 1.0  # c_loc
    norm_penalty: float = 0.0     # eta in front of ||dW_t||_F^2 (a real gradient, through the factors)
    gen_prompts: tuple[str, ...] = GEN_PROMPTS
    locality_reference: str = "previous"  # KL against W_{t-1} ("previous") or the unedited W_0 ("original")
    look_back: str = "recent"     # which k batches a step scores: the k most recent, or spread over the sequence
    locality_batches: str = "look_back"  # whose locality prompts a step scores: the look-back batches', or the
                                         # current batch's standing for them (1/k of the rows)
    chunk_rows: int | None = None  # rows per LLM pass when scoring; None: the current batch's rows (memory flat in k)

    def __post_init__(self):
        object.__setattr__(self, "gen_prompts", tuple(self.gen_prompts))  # a config's list reads as a tuple
        bad_chunk = self.chunk_rows is not None and self.chunk_rows < 1
        if self.sequence_length < 1 or self.back_depth < 1 or bad_chunk or not 0 < self.decay <= 1 or not 0 < self.discount <= 1:
            raise ConfigError(f"objective: sequence_length={self.sequence_length}, back_depth={self.back_depth} "
                              f"and chunk_rows={self.chunk_rows} must be >= 1, decay={self.decay} and discount={self.discount} in (0, 1]")
        unknown = set(self.gen_prompts) - set(GEN_PROMPTS)
        if unknown or not self.gen_prompts:
            raise ConfigError(f"objective: gen_prompts={list(self.gen_prompts)}: choose from {list(GEN_PROMPTS)}")
        if self.locality_reference not in LOCALITY_REFERENCES:
            raise ConfigError(f"objective: locality_reference={self.locality_reference!r}: choose from "
                              f"{list(LOCALITY_REFERENCES)}")
        if self.look_back not in LOOK_BACKS:
            raise ConfigError(f"objective: look_back={self.look_back!r}: choose from {list(LOOK_BACKS)}")
        if self.locality_batches not in LOCALITY_BATCHES:
            raise ConfigError(f"objective: locality_batches={self.locality_batches!r}: choose from "
                              f"{list(LOCALITY_BATCHES)}")


@dataclass
class RolloutStats:
    """What one sequence did: mean losses, the return (normalised by T), mean update norms, non-finite flag."""

    gen_loss: float = 0.0
    loc_loss: float = 0.0
    norm_sq: float = 0.0
    ret: float = 0.0
    finite: bool = True
    update_norms: dict[str, float] = field(default_factory=dict)


def _leaves(update: FactoredUpdate) -> FactoredUpdate:
    """Detached copies of the factors that carry gradient, made leaves that collect dLoss/dfactor."""
    def leaf(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.detach().requires_grad_(t.requires_grad)

    return {name: ModuleUpdate(leaf(u.P), leaf(u.Q), leaf(u.scale), u.alpha, u.row_mask) for name, u in update.items()}


def _through_editor(update: FactoredUpdate, leaves: FactoredUpdate) -> None:
    """Second stage: push the leaves' accumulated gradients through the editor's graph once."""
    outputs, grads = [], []
    for name, u in update.items():
        for out, leaf in ((u.P, leaves[name].P), (u.Q, leaves[name].Q), (u.scale, leaves[name].scale)):
            if out is not None and out.requires_grad and leaf.grad is not None:
                outputs.append(out)
                grads.append(leaf.grad)
    if outputs:
        torch.autograd.backward(outputs, grads)


def _look_back(t: int, objective: Objective) -> list[tuple[int, float]]:
    """The batches step t's reward scores, as (step, weight) pairs; the weights stand for sum_j mu^j L(E_{t-j}).

    "recent" (the paper): the k batches t, t-1, ..., t-k+1, weighted mu^j. "spread": batch t and k-1 earlier
    batches, one from each of k-1 contiguous stretches of 0..t-1, weighted by the summed mu^j of its
    stretch; the pick inside a stretch moves with t (a golden-ratio sequence: deterministic, evenly spread),
    so over a sequence the earlier batches are all scored, in turn. Both cost k
    batches a step, but only "spread" lets a step of a long sequence see whether the first edits survive,
    which is what a lifelong evaluation of all edits on the final model measures.
    """
    k = objective.back_depth
    if objective.look_back == "recent" or t < k:
        return [(i, objective.decay ** (t - i)) for i in range(t, max(t - k, -1), -1)]
    picks = [(t, 1.0)]
    for s in range(k - 1):
        start, stop = s * t // (k - 1), (s + 1) * t // (k - 1)
        weight = sum(objective.decay ** (t - i) for i in range(start, stop))
        picks.append((start + int((t * GOLDEN_FRACTION) % 1.0 * (stop - start)), weight))
    return picks


def _locality_look_back(t: int, objective: Objective) -> list[tuple[int, float]]:
    """The batches whose locality prompts step t scores. "current": batch t's alone, weighted by the whole
    look-back's weight. Locality prompts ask facts of subjects no batch edits, drawn alike for every batch,
    so each batch's prompts sample the same damage to unedited facts: the same loss in expectation, at 1/k
    of the locality rows."""
    look_back = _look_back(t, objective)
    if objective.locality_batches == "current":
        return [(t, sum(weight for _, weight in look_back))]
    return look_back


def _scored_rows(steps: Sequence[EditBatch], look_back: list[tuple[int, float]], kinds: Sequence[str],
                 step_weight: float) -> tuple[TokenizedBatch, torch.Tensor] | None:
    """The rows of `kinds` of the `look_back` batches, stacked, with per-row weights chosen so that the sum of
    weighted row sums is sum_j step_weight * w_j * (mean loss over the target tokens of batch j), w_j the
    look-back weights."""
    parts, weights = [], []
    for i, weight in look_back:
        for kind in kinds:
            batch = getattr(steps[i], kind)
            if batch.num_rows == 0:
                continue
            n_tokens = int((batch.labels[:, 1:] != IGNORE_INDEX).sum())
            parts.append(batch)
            weights.append(torch.full((batch.num_rows,), step_weight * weight / n_tokens,
                                      device=batch.input_ids.device))
    return (TokenizedBatch.concat(parts), torch.cat(weights)) if parts else None


def _chunk_size(objective: Objective, current: EditBatch, kinds: Sequence[str]) -> int:
    """`chunk_rows`, by default as many rows as the current step's own batches of `kinds` have, so a pass
    is never larger than at back_depth 1."""
    return objective.chunk_rows or max(1, sum(getattr(current, kind).num_rows for kind in kinds))


def _chunks(rows: TokenizedBatch, weights: torch.Tensor, size: int):
    """Consecutive chunks of `size` rows with their weights."""
    for start in range(0, rows.num_rows, size):
        yield rows.rows(start, start + size), weights[start:start + size]


def _original_locality(model: nn.Module, steps: Sequence[EditBatch]) -> list[torch.Tensor]:
    """Each step's locality answer distributions under the unedited weights (before any commit)."""
    with torch.no_grad():
        return [answer_log_probs(forward_logits(model, s.locality), s.locality.labels) if s.locality.num_rows
                else None for s in steps]


def _locality_chunks(model: nn.Module, loc: tuple[TokenizedBatch, torch.Tensor], size: int,
                     original: list[torch.Tensor | None] | None, look_back: list[tuple[int, float]]):
    """Chunks of the scored locality rows with their weights and reference answer distributions: the
    unedited model's (`original`, computed before the sequence) or else the committed weights' (now)."""
    rows, weights = loc
    if original is not None:
        reference = torch.cat([original[i] for i, _ in look_back if original[i] is not None])
        per_row = (rows.labels[:, 1:] != IGNORE_INDEX).sum(-1).tolist()
    for start, (chunk, chunk_weights) in zip(range(0, rows.num_rows, size), _chunks(rows, weights, size)):
        if original is not None:
            first = sum(per_row[:start])
            base = reference[first:first + sum(per_row[start:start + size])]
        else:
            with torch.no_grad():
                base = answer_log_probs(forward_logits(model, chunk), chunk.labels)
        yield chunk, chunk_weights, base


def rollout(editor: Editor, model: nn.Module, modules: Mapping[str, nn.Module], ledger: UpdateLedger,
            steps: Sequence[EditBatch], objective: Objective,
            on_step: Callable[[int], None] | None = None) -> RolloutStats:
    """Roll `steps` forward with the current editor, accumulating gradients into its parameters.

    The ledger must be empty at the start; it is empty again (weights restored) at the end, also on error.
    `on_step(t)` is called after each step's gradients are accumulated (for optimizer steps every m steps).
    Scored rows go through the LLM in chunks no larger than one step's batch, so memory does not grow with k.
    """
    if len(ledger):
        raise RuntimeError("rollout needs the original weights: the ledger already holds commits")
    stats = RolloutStats()
    gen_mass = loc_mass = 0.0
    editor.reverted()  # a new sequence: no memory of an earlier one
    original = _original_locality(model, steps) if objective.locality_reference == "original" \
        and objective.locality_weight > 0 else None
    try:
        for t, batch in enumerate(steps):
            update = editor.predict_update(model, modules, batch.edit)
            leaves = _leaves(update)
            step_weight = objective.discount ** t / len(steps)
            look_back = _look_back(t, objective)
            mass = step_weight * sum(weight for _, weight in look_back)

            gen = _scored_rows(steps, look_back, objective.gen_prompts, step_weight)
            for chunk, weights in _chunks(*gen, _chunk_size(objective, batch, objective.gen_prompts)) if gen else ():
                with functional_update(modules, leaves):
                    loss = weighted_target_nll(forward_logits(model, chunk), chunk.labels, weights)
                loss.backward()
                stats.finite &= bool(torch.isfinite(loss))
                stats.gen_loss += loss.item()
            gen_mass += mass * len(objective.gen_prompts)

            loc_look_back = _locality_look_back(t, objective)
            loc = _scored_rows(steps, loc_look_back, ("locality",), step_weight) \
                if objective.locality_weight > 0 else None
            for chunk, weights, base in _locality_chunks(model, loc, _chunk_size(objective, batch, ("locality",)),
                                                         original, loc_look_back) if loc else ():
                with functional_update(modules, leaves):
                    loss = weighted_locality_kl(base, forward_logits(model, chunk), chunk.labels, weights)
                (objective.locality_weight * loss).backward()
                stats.finite &= bool(torch.isfinite(loss))
                stats.loc_loss += loss.item()
            loc_mass += mass

            norm_sq = sum(u.frobenius_sq() for u in leaves.values())
            if objective.norm_penalty > 0:
                (step_weight * objective.norm_penalty * norm_sq).backward()
            stats.norm_sq += float(norm_sq.detach()) / len(steps)
            stats.ret -= objective.norm_penalty * step_weight * float(norm_sq.detach())
            _through_editor(update, leaves)
            for name, u in leaves.items():
                norm = math.sqrt(float(u.detach().frobenius_sq()))
                stats.update_norms[name] = stats.update_norms.get(name, 0.0) + norm / len(steps)
            ledger.commit({name: u.detach() for name, u in update.items()})
            editor.committed()
            if on_step is not None:
                on_step(t)
    finally:
        ledger.revert()
        editor.reverted()
    stats.ret -= stats.gen_loss + objective.locality_weight * stats.loc_loss
    stats.gen_loss /= max(gen_mass, 1e-12)
    stats.loc_loss /= max(loc_mass, 1e-12)
    return stats
