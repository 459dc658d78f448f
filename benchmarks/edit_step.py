"""Where the time of one edit step goes, against the floor of a bare forward+backward of the same batch.

    python benchmarks/edit_step.py --threads 1 --repeats 30                       # tiny model, synthetic world
    python benchmarks/edit_step.py --model smollm2-135m --threads 1 --repeats 15  # SmolLM2-135M, CounterFact
    python benchmarks/edit_step.py --checkpoint <run_dir>/editor.ckpt             # a trained editor
    python benchmarks/edit_step.py --model smollm2-135m model.edit_modules='[...]'  # extra Hydra overrides

Run it from the repository root (data configs name `../shared/data/...` relative to it). One edit step is
what `EditSession.edit` does, split into its phases:
  capture       forward + backward of the edit loss with the capture hooks (keys K, value gradients G)
  hypernetwork  the editor's bank: normalizer update and the per-shape network (K, G -> K~, G~)
  solve         the rest of `update_from_factors`: step coefficients and the ridge solve (P, Q)
  commit        the ledger (checks, fp32 copies of the factors, the fused kernel into every weight) and
                the editor's record of the commit (a ridge editor's key memory of earlier edits)
The floor is what a plain gradient of the edited weights costs: forward, target-token cross-entropy and
`torch.autograd.grad` of the edited weights on the same batch and model. Its graph starts at the first
edited module, exactly where capture's starts, so neither is charged for layers the other skips.
Before the rounds, one other batch of requests is edited and stays committed, so every timed step edits
on top of an earlier edit as the steps of a lifelong sequence do (a ridge editor with `edit_memory` then
solves with its memory of earlier keys, as it does from the second step of a sequence on). Every round
times the floor, the phases of one edit and (as a check of the split) `EditSession.edit` end to end; each
timed edit is reverted before the next round, so every round edits the same model. Rounds are
interleaved so load from other processes hits all alike; the table holds medians after warm-up (the
first edit also calibrates an untrained editor's step sizes). The lifelong normalizer keeps observing,
as it does while editing.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from harness import ONE_ROUND_RLEDIT, compose_config, default_data, synchronize
from omegaconf import DictConfig

from rledit.data.collate import TokenizedBatch
from rledit.data.streams import EditStream
from rledit.editing.losses import forward_logits, target_nll
from rledit.editors.hypernet_editor import HypernetEditor
from rledit.models.layers import EditableModule
from rledit.pipeline import (
    build_editor,
    build_experiment,
    checkpoint_editor_class,
    checkpoint_experiment,
    set_up_editor,
)
from rledit.session import EditSession
from rledit.threads import cpu_threads

PHASES = ("capture", "hypernetwork", "solve", "commit")
LIMIT = 1.3  # issue 6: an edit step costs at most 1.3x the bare forward+backward of its batch


@dataclass
class Breakdown:
    """Per-round seconds of each phase, of the end-to-end edit and of the floor."""

    phases: dict[str, list[float]]
    end_to_end: list[float]
    floor: list[float]
    captured_tokens: int

    @property
    def totals(self) -> list[float]:
        """Per-round edit step: the sum of its phases."""
        return [sum(round_) for round_ in zip(*self.phases.values())]

    def median(self, part: str) -> float:
        """Median seconds of a phase, of "total", "end_to_end" or "floor"."""
        series = {**self.phases, "total": self.totals, "end_to_end": self.end_to_end, "floor": self.floor}
        return statistics.median(series[part])

    @property
    def ratio(self) -> float:
        """Edit step over floor: the median of the per-round ratios (each round shares its load)."""
        return statistics.median(t / f for t, f in zip(self.totals, self.floor))


class PhaseClock:
    """Seconds spent inside one module's forward calls (here: the editor's hypernetwork bank)."""

    def __init__(self, module: torch.nn.Module, device: torch.device):
        self.seconds, self._device, self._started = 0.0, device, 0.0
        self._handles = [module.register_forward_pre_hook(self._start),
                         module.register_forward_hook(self._stop)]

    def _start(self, *_) -> None:
        synchronize(self._device)
        self._started = time.perf_counter()

    def _stop(self, *_) -> None:
        synchronize(self._device)
        self.seconds += time.perf_counter() - self._started

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def clock(device: torch.device) -> float:
    synchronize(device)
    return time.perf_counter()


def timed_phases(session: EditSession, batch: TokenizedBatch, device: torch.device) -> dict[str, float]:
    """One `EditSession.edit` of `batch`, phase by phase (the same calls in the same no-grad context); then
    reverted. The end-to-end row of the table checks that the split still matches `EditSession.edit`."""
    editor = session.editor
    bank_clock = PhaseClock(editor.bank, device)
    try:
        with torch.no_grad():
            start = clock(device)
            factors = editor.capture(session.model, session.modules, batch)
            captured = clock(device)
            update = editor.update_from_factors(factors)
            solved = clock(device)
        session.ledger.commit(update)
        editor.committed()
        committed = clock(device)
    finally:
        bank_clock.remove()
    session.revert(1)
    return {"capture": captured - start, "hypernetwork": bank_clock.seconds,
            "solve": solved - captured - bank_clock.seconds, "commit": committed - solved}


def timed_end_to_end(session: EditSession, batch: TokenizedBatch, device: torch.device) -> float:
    start = clock(device)
    session.edit(batch)
    seconds = clock(device) - start
    session.revert(1)
    return seconds


@contextmanager
def weights_requiring_grad(editable: Mapping[str, EditableModule]) -> Iterator[list[torch.nn.Parameter]]:
    """The edited weights with requires_grad on inside the block (the model stays frozen otherwise)."""
    weights = [em.module.weight for em in editable.values()]
    try:
        for weight in weights:
            weight.requires_grad_(True)
        yield weights
    finally:
        for weight in weights:
            weight.requires_grad_(False)


def timed_floor(model: torch.nn.Module, editable: Mapping[str, EditableModule], batch: TokenizedBatch,
                device: torch.device) -> float:
    """A plain gradient of the edited weights on the edit batch: forward, target cross-entropy, backward."""
    with weights_requiring_grad(editable) as weights, torch.enable_grad():
        start = clock(device)
        torch.autograd.grad(target_nll(forward_logits(model, batch), batch.labels), weights)
        return clock(device) - start


def measure(session: EditSession, batch: TokenizedBatch, history: TokenizedBatch, repeats: int, warm_up: int,
            device: torch.device) -> Breakdown:
    """Interleaved rounds of floor, phased edit and end-to-end edit of `batch`, on top of the committed edit
    of `history`; the first `warm_up` rounds are dropped. The session ends with nothing committed."""
    if not isinstance(session.editor, HypernetEditor):
        raise SystemExit(f"the phase breakdown needs a hypernetwork editor, got {type(session.editor).__name__}")
    result = Breakdown({phase: [] for phase in PHASES}, [], [], captured_tokens=int(batch.target_mask.sum()))
    session.edit(history)
    try:
        for round_ in range(warm_up + repeats):
            floor = timed_floor(session.model, session.editable, batch, device)
            phases = timed_phases(session, batch, device)
            end_to_end = timed_end_to_end(session, batch, device)
            if round_ >= warm_up:
                result.floor.append(floor)
                result.end_to_end.append(end_to_end)
                for phase, seconds in phases.items():
                    result.phases[phase].append(seconds)
    finally:
        session.revert()
    return result


def markdown_table(b: Breakdown) -> str:
    floor = b.median("floor")
    rows = [("capture (forward + backward, hooks)", "capture"), ("hypernetwork (normalizer + network)", "hypernetwork"),
            ("solve (coefficients, ridge solve)", "solve"), ("commit (ledger, fused kernel)", "commit"),
            ("**edit step (sum of phases)**", "total"), ("EditSession.edit end to end (check)", "end_to_end"),
            ("floor: forward + backward, grad of edited weights", "floor")]
    lines = ["| part | median ms | / floor |", "|---|---:|---:|"]
    lines += [f"| {label} | {b.median(key) * 1e3:.1f} | {b.median(key) / floor:.3f} |" for label, key in rows]
    per_round = sorted(t / f for t, f in zip(b.totals, b.floor))
    lines.append(f"\nedit step / floor = **{b.ratio:.3f}x** (median of {len(per_round)} per-round ratios, "
                 f"range {per_round[0]:.3f}-{per_round[-1]:.3f}; limit {LIMIT}x)")
    return "\n".join(lines)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", help="a config in configs/model (default: tiny)")
    parser.add_argument("--data", default=None,
                        help="a config in configs/data (default: synthetic for tiny, counterfact otherwise)")
    parser.add_argument("--editor", default="rledit",
                        help="a config in configs/editor (default: rledit, untrained, one round without the prior)")
    parser.add_argument("--checkpoint", default=None, help="a trained editor.ckpt (overrides --editor)")
    parser.add_argument("--edits", type=int, default=10, help="edit requests in the batch (default 10)")
    parser.add_argument("--repeats", type=int, default=9, help="timed rounds (default 9)")
    parser.add_argument("--warm-up", type=int, default=2, help="untimed rounds first (default 2)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: the model config's cpu_threads, else torch's choice)")
    parser.add_argument("--seed", type=int, default=0, help="which requests are drawn from the eval records")
    parser.add_argument("--fail-over-limit", action="store_true",
                        help=f"exit with status 1 when the edit step costs more than {LIMIT}x the floor")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides of configs/evaluate.yaml")
    return parser.parse_args()


def run(args: argparse.Namespace, cfg: DictConfig, data: str) -> float:
    """Build the configured experiment, measure, print the table; returns edit step / floor."""
    torch.manual_seed(cfg.seed)
    path = str(Path(args.checkpoint).resolve()) if args.checkpoint else None
    if path:
        experiment, editor, ckpt = checkpoint_experiment(cfg, path)
        editor_label = f"{checkpoint_editor_class(ckpt)} from {args.checkpoint}"
    else:
        experiment = build_experiment(cfg)
        editor = build_editor(cfg, experiment)
        editor_label = f"editor={args.editor} ({'untrained' if editor.trainable else 'training-free'})"
    if getattr(editor, "rounds", 1) != 1:
        raise SystemExit(f"edit_step times the phases of one capture-and-solve round; the editor runs "
                         f"{editor.rounds}: add editor.build.rounds=1")
    set_up_editor(cfg, experiment, editor)
    session = EditSession(experiment.model, experiment.editable, editor)
    device = experiment.device
    history, timed = (experiment.collator(step).edit.to(device)
                      for step in EditStream(experiment.data.eval, 2, args.edits, cfg.seed).steps)
    result = measure(session, timed, history, args.repeats, args.warm_up, device)
    print(f"model={args.model} data={data} {editor_label}; {len(experiment.editable)} edited modules; "
          f"{args.edits} edits = {timed.num_rows} rows x {timed.input_ids.shape[1]} tokens, "
          f"{result.captured_tokens} target tokens captured; device {device}, {torch.get_num_threads()} "
          f"torch threads, torch {torch.__version__}; median of {args.repeats} rounds after {args.warm_up} "
          f"warm-up{''.join(' ' + o for o in args.overrides)}\n")
    print(markdown_table(result))
    return result.ratio


def main() -> None:
    args = parse_args()
    data = args.data or default_data(args.model)
    one_step = ONE_ROUND_RLEDIT if args.editor == "rledit" and not args.checkpoint else []
    cfg = compose_config("evaluate", [f"model={args.model}", f"data={data}", f"editor={args.editor}",
                                      f"seed={args.seed}", *one_step, *args.overrides])
    with cpu_threads(args.threads or cfg.cpu_threads):
        ratio = run(args, cfg, data)
    if args.fail_over_limit and ratio > LIMIT:
        sys.exit(1)


if __name__ == "__main__":
    main()
