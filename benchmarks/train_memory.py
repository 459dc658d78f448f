"""Seconds per RLEdit training step and its peak memory against the memory backtracking depth k (`back_depth`).

    python benchmarks/train_memory.py --threads 1            # tiny synthetic-world model, k = 1, 3, 10
    python benchmarks/train_memory.py --model smollm2-135m   # SmolLM2-135M on CounterFact (../shared/data)
    python benchmarks/train_memory.py --depths 1 10 training.edits_per_step=5   # extra Hydra overrides
    python benchmarks/train_memory.py --timed-steps 5        # more timed steps per k (default 3)

One training step is EditorTrainer's: roll one sequence of --sequence-length edit batches (at least the
largest k, so every k is really used), then take the optimizer step. Each k runs in a fresh process,
through a Lightning Trainer built from configs/ as train.py builds it: one warm-up step, --timed-steps
timed steps (their median is "s/step"), then one step whose memory is measured (its probe slows it down):
  CUDA  torch.cuda.max_memory_allocated over the step;
  CPU   the bytes of live tensors: a dispatch mode counts every storage an op of the step allocates
        until it is freed (RSS is useless here: the allocator keeps freed memory), on top of the
        bytes of the LLM, the editor and the optimizer state.
"step" is the peak minus what was live when the step began (LLM, editor, optimizer state): the memory
the step itself needs. "total" is the peak including all of that. The two-stage backward frees each
loss graph at once, so memory is flat in k as long as one LLM pass scores no more rows at large k than
at k=1 (see `editor.objective.chunk_rows`). The script exits with status 1 if the step memory at the
largest k exceeds LIMIT times that at the smallest.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import lightning as L
import torch
from harness import ROOT, LiveTensorMemory, MiB, compose_config, default_data, synchronize
from hydra.utils import instantiate

from rledit.pipeline import build_editor, build_experiment, set_up_editor
from rledit.threads import cpu_threads
from rledit.training.module import EditorTrainer, FrozenTarget

LIMIT = 1.25
WARM_UP_STEPS = 1


def resident_bytes(module: EditorTrainer, optimizer: torch.optim.Optimizer) -> int:
    """Bytes live before a step: the LLM's and editor's parameters and buffers, and the optimizer state."""
    model, editor = module.target.model, module.editor
    tensors = [*model.parameters(), *model.buffers(), *editor.parameters(), *editor.buffers()]
    tensors += [v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v)]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


class StepProbe(L.Callback):
    """Times the steps after the warm-up; measures the memory of the last step (its peak, and what was
    live when it began). The memory probe slows its step down, so that step is never timed."""

    def __init__(self, timed_steps: int):
        self.timed = range(WARM_UP_STEPS, WARM_UP_STEPS + timed_steps)
        self.measured = WARM_UP_STEPS + timed_steps
        self.seconds: list[float] = []
        self.started = 0.0
        self.live_at_start = self.peak = 0
        self.tracker: LiveTensorMemory | None = None

    @property
    def steps(self) -> int:
        return self.measured + 1

    def on_train_batch_start(self, trainer: L.Trainer, module: EditorTrainer, batch, batch_idx: int) -> None:
        synchronize(module.device)
        if batch_idx == self.measured and module.device.type == "cuda":
            self.live_at_start = torch.cuda.memory_allocated(module.device)
            torch.cuda.reset_peak_memory_stats(module.device)
        elif batch_idx == self.measured:
            self.live_at_start = resident_bytes(module, trainer.optimizers[0])
            self.tracker = LiveTensorMemory(module.device)
            self.tracker.__enter__()
        self.started = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, module: EditorTrainer, outputs, batch,
                           batch_idx: int) -> None:
        synchronize(module.device)
        if batch_idx in self.timed:
            self.seconds.append(time.perf_counter() - self.started)
        if batch_idx == self.measured and module.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(module.device)
        elif batch_idx == self.measured:
            self.tracker.__exit__(None, None, None)
            self.peak = self.live_at_start + self.tracker.peak


def measure(overrides: list[str], timed_steps: int, threads: int | None) -> dict:
    """Training steps of the configured editor: the timed steps' median seconds, the measured step's memory."""
    cfg = compose_config("train", overrides)
    with cpu_threads(threads or cfg.cpu_threads):
        L.seed_everything(cfg.seed)
        experiment = build_experiment(cfg)
        editor = build_editor(cfg, experiment)
        set_up_editor(cfg, experiment, editor)
        objective = instantiate(cfg.editor.objective)
        probe = StepProbe(timed_steps)
        datamodule = instantiate(cfg.datamodule, _partial_=True)(
            experiment.data.train, experiment.data.eval, experiment.collator,
            train_num_steps=objective.sequence_length, eval_num_steps=1, sequences_per_epoch=probe.steps)
        module = instantiate(cfg.module, _partial_=True)(
            editor, FrozenTarget(experiment.model, experiment.editable), objective)
        trainer = instantiate(cfg.trainer, max_epochs=1, logger=False, callbacks=[probe], limit_val_batches=0,
                              enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
        trainer.fit(module, datamodule=datamodule)
        return {"back_depth": objective.back_depth, "device": str(module.device),
                "threads": torch.get_num_threads(), "seconds": statistics.median(probe.seconds),
                "seconds_min": min(probe.seconds), "seconds_max": max(probe.seconds),
                "step_bytes": probe.peak - probe.live_at_start, "total_bytes": probe.peak}


def run_in_fresh_process(overrides: list[str], timed_steps: int, threads: int | None) -> dict:
    threads_option = ["--threads", str(threads)] if threads else []
    command = [sys.executable, __file__, "--measure-one", "--timed-steps", str(timed_steps), *threads_option,
               *overrides]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        sys.exit(f"{' '.join(command)} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", help="a config in configs/model (default: tiny)")
    parser.add_argument("--data", default=None,
                        help="a config in configs/data (default: synthetic for tiny, counterfact otherwise)")
    parser.add_argument("--depths", type=int, nargs="+", default=[1, 3, 10])
    parser.add_argument("--sequence-length", type=int, default=None,
                        help="edit batches per training sequence (default: the largest depth)")
    parser.add_argument("--timed-steps", type=int, default=3, help="timed training steps per k (default 3)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads per run (default: the model config's cpu_threads, else torch's)")
    parser.add_argument("--measure-one", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides of configs/train.yaml")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.measure_one:
        print(json.dumps(measure(args.overrides, args.timed_steps, args.threads)))
        return

    data = args.data or default_data(args.model)
    length = args.sequence_length or max(args.depths)
    common = [f"model={args.model}", f"data={data}", f"editor.objective.sequence_length={length}",
              *args.overrides]
    rows = [run_in_fresh_process([*common, f"editor.objective.back_depth={depth}"], args.timed_steps, args.threads)
            for depth in sorted(args.depths)]
    first, last = rows[0], rows[-1]
    memory = "cuda max_memory_allocated" if first["device"].startswith("cuda") else "live tensor bytes"
    print(f"model={args.model} data={data} sequence_length={length}{''.join(' ' + o for o in args.overrides)}; device "
          f"{first['device']}, {first['threads']} torch threads, torch {torch.__version__}; memory = {memory}; "
          f"s/step = median of {args.timed_steps} steps after {WARM_UP_STEPS} warm-up\n")
    print("| back_depth | s/step | (min-max) | step MiB | total MiB |")
    print("|---:|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {row['back_depth']} | {row['seconds']:.2f} | {row['seconds_min']:.2f}-{row['seconds_max']:.2f} "
              f"| {row['step_bytes'] / MiB:.1f} | {row['total_bytes'] / MiB:.1f} |")
    step_ratio = last["step_bytes"] / first["step_bytes"]
    total_ratio = last["total_bytes"] / first["total_bytes"]
    print(f"\nk={last['back_depth']} / k={first['back_depth']}: step memory {step_ratio:.3f}x, total "
          f"{total_ratio:.3f}x (limit {LIMIT}x), s/step {last['seconds'] / first['seconds']:.2f}x")
    if step_ratio > LIMIT:
        sys.exit(1)


if __name__ == "__main__":
    main()
