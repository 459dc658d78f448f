"""The step sizes and ridges an untrained ridge editor calibrates on the first batch of each edit sequence,
against those a trained editor's checkpoint keeps from the training batch it was calibrated on.

    python benchmarks/first_batch_calibration.py --seeds 0-6 \\
        --checkpoint outputs/train/<run>/editor-start.ckpt \\
        experiment=smollm2-cf-1000/training-free-rounds data=counterfact
    (again with data=counterfact-validation data.records.eval_size=1000)

Each sequence is drawn as `evaluate.py seed=S` draws it; one round of factors is captured on its first batch and
calibrates a fresh editor. Printed per sequence: the mean over the edited modules of the log step size and of
the log ridge, then their mean and standard deviation over the sequences.
"""

from __future__ import annotations

import argparse
import statistics

import torch
from harness import compose_config

from rledit.data.streams import EditStream
from rledit.pipeline import build_editor, build_experiment, read_editor_checkpoint, set_up_editor
from rledit.threads import cpu_threads


def seeds(spec: str) -> list[int]:
    first, _, last = spec.partition("-")
    return list(range(int(first), int(last or first) + 1))


def module_means(state: dict[str, torch.Tensor]) -> tuple[float, float]:
    """Mean log step size and mean log ridge over every module of a ridge editor's state."""
    def mean(leaf: str) -> float:
        values = torch.cat([v.flatten() for k, v in state.items() if k.endswith(f".{leaf}")])
        return float(values.mean())
    return mean("log_eta"), mean("log_lambda")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="0-2", help="sequences to draw, as evaluate.py's seed: 3 or 0-6")
    parser.add_argument("--checkpoint", help="an editor.ckpt whose calibrated values to print beside them")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of configs/evaluate.yaml")
    args = parser.parse_args()
    cfg = compose_config("evaluate", args.overrides)
    if args.checkpoint:
        eta, ridge = module_means(read_editor_checkpoint(args.checkpoint)["state_dict"])
        print(f"{args.checkpoint}: log step size {eta:.3f}, log ridge {ridge:.3f}")
    with cpu_threads(args.threads):
        experiment = build_experiment(cfg)
        found = []
        for seed in seeds(args.seeds):
            editor = build_editor(cfg, experiment)
            set_up_editor(cfg, experiment, editor)
            first = EditStream(experiment.data.eval, cfg.num_steps, cfg.edits_per_step, seed).steps[0]
            batch = experiment.collator(first).edit.to(experiment.device)
            modules = {name: em.module for name, em in experiment.editable.items()}
            editor.update_from_factors(editor.capture(experiment.model, modules, batch))
            found.append(module_means(editor.state_dict()))
            print(f"seed {seed}: log step size {found[-1][0]:.3f}, log ridge {found[-1][1]:.3f}", flush=True)
    for label, values in (("log step size", [f[0] for f in found]), ("log ridge", [f[1] for f in found])):
        spread = f" (sd {statistics.stdev(values):.3f})" if len(values) > 1 else ""
        print(f"{label}: mean {statistics.mean(values):.3f}{spread} over {len(values)} sequences")


if __name__ == "__main__":
    main()
