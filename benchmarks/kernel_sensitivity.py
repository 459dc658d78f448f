"""How far one edit sequence moves when only torch's CPU kernels change: the same config and sequence edited in
one process per kernel set, compared round by round.

    python benchmarks/kernel_sensitivity.py --steps 2 experiment=smollm2-cf-1000/training-free-rounds seed=0

Each kernel set runs in its own process (`ATEN_CPU_CAPABILITY`, and MKL's instruction set for `avx2`), edits the
first `--steps` batches of the sequence `evaluate.py seed=S` draws, and records every round's captured value
gradients and each step's cumulative weight change. Printed per step and round: the relative difference of the
value gradients from those of the machine's own kernels (the mean over the edited modules), then that of the
cumulative update after each step. Rounding differences start near 1e-6; how fast they grow says how much of a
1,000-edit result is one draw among many equally valid roundings.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from harness import compose_config

from rledit.data.streams import EditStream
from rledit.pipeline import build_editor, build_experiment, set_up_editor
from rledit.session import EditSession
from rledit.threads import cpu_threads

KERNEL_SETS = {"native": {}, "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
               "default": {"ATEN_CPU_CAPABILITY": "default"}}


def record(session: EditSession, batches: list) -> dict[str, list]:
    """Edit `batches` in order; every round's value gradients per module, and the weight changes after each step."""
    editor, rounds = session.editor, []
    update_from_factors = editor.update_from_factors

    def recording(factors):
        rounds.append({name: f.grads.detach().double().clone() for name, f in factors.items()})
        return update_from_factors(factors)

    editor.update_from_factors = recording
    before = {name: module.weight.detach().double().clone() for name, module in session.modules.items()}
    steps = []
    try:
        for batch in batches:
            first = len(rounds)
            session.edit(batch)
            steps.append({"rounds": rounds[first:], "update": {
                name: module.weight.detach().double() - before[name] for name, module in session.modules.items()}})
    finally:
        del editor.update_from_factors
    return {"steps": steps}


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(torch.finfo(torch.float64).tiny))


def compare(run: dict[str, list], reference: dict[str, list]) -> list[tuple[list[float], float]]:
    """Per step: each round's mean relative gradient difference over modules, and the update's."""
    table = []
    for step, ref in zip(run["steps"], reference["steps"], strict=True):
        rounds = [statistics.fmean(relative(r[name], q[name]) for name in q)
                  for r, q in zip(step["rounds"], ref["rounds"], strict=True)]
        update = relative(torch.cat([u.flatten() for u in step["update"].values()]),
                          torch.cat([u.flatten() for u in ref["update"].values()]))
        table.append((rounds, update))
    return table


def record_to(path: str, steps: int, threads: int, overrides: list[str]) -> None:
    cfg = compose_config("evaluate", overrides)
    with cpu_threads(threads):
        torch.manual_seed(cfg.seed)
        experiment = build_experiment(cfg)
        editor = build_editor(cfg, experiment)
        set_up_editor(cfg, experiment, editor)
        stream = EditStream(experiment.data.eval, cfg.num_steps, cfg.edits_per_step, cfg.seed).steps[:steps]
        batches = [experiment.collator(step).edit.to(experiment.device) for step in stream]
        torch.save(record(EditSession(experiment.model, experiment.editable, editor), batches), path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--kernel-sets", default="native,avx2,default",
                        help=f"comma-separated, the first the reference: {', '.join(KERNEL_SETS)}")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--record", help=argparse.SUPPRESS)  # the child process: record to this file
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of configs/evaluate.yaml")
    args = parser.parse_args()
    if args.record:
        record_to(args.record, args.steps, args.threads, args.overrides)
        return
    names = args.kernel_sets.split(",")
    unknown = [n for n in names if n not in KERNEL_SETS]
    if unknown:
        parser.error(f"--kernel-sets: unknown {', '.join(unknown)}; expected some of {', '.join(KERNEL_SETS)}")
    runs = {}
    with tempfile.TemporaryDirectory() as folder:
        for name in names:
            path = str(Path(folder) / f"{name}.pt")
            env = {k: v for k, v in os.environ.items() if k not in ("ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS")}
            subprocess.run([sys.executable, __file__, "--record", path, "--steps", str(args.steps), "--threads",
                            str(args.threads), *args.overrides], env={**env, **KERNEL_SETS[name]}, check=True)
            runs[name] = torch.load(path, weights_only=True)
    capability = torch.backends.cpu.get_cpu_capability()
    print(f"reference: {names[0]} kernels (this machine's: {capability}); {args.steps} steps of "
          f"{' '.join(args.overrides) or 'the default config'}")
    for name in names[1:]:
        for step, (rounds, update) in enumerate(compare(runs[name], runs[names[0]]), start=1):
            print(f"{name} step {step}: value gradients, round by round: "
                  + " ".join(f"{r:.1e}" for r in rounds) + f"; cumulative update {update:.1e}")


if __name__ == "__main__":
    main()
