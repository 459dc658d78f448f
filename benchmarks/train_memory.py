"""Peak memory of one RLEdit training step against the memory backtracking depth k (`back_depth`).

    python benchmarks/train_memory.py                        # tiny synthetic-world model, k = 1, 3, 10
    python benchmarks/train_memory.py --model smollm2-135m   # SmolLM2-135M on CounterFact (../shared/data)
    python benchmarks/train_memory.py --depths 1 10 training.edits_per_step=5   # extra Hydra overrides
    python benchmarks/train_memory.py --threads 1            # steadier timings on a shared machine

One training step is EditorTrainer's: roll one sequence of --sequence-length edit batches (at least the
largest k, so every k is really used), then take the optimizer step. Each k runs in a fresh process,
through a Lightning Trainer built from configs/ as train.py builds it: one warm-up step, one timed step,
then one step whose memory is measured:
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
import subprocess
import sys
import time
import weakref
from pathlib import Path

import lightning as L
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from rledit.data.streams import EditStreamDataModule
from rledit.pipeline import build_editor, build_experiment, build_objective
from rledit.training.module import EditorTrainer, FrozenTarget

LIMIT = 1.25
WARM_UP, TIMED, MEASURED = 0, 1, 2  # the training steps (sequences) of each run
MiB = 2**20


class LiveTensorMemory(TorchDispatchMode):
    """Live and peak bytes of the tensor storages that ops allocate on `device` while the mode is active.

    A storage counts from the op that creates it until it is freed (a finalizer on the storage). Outputs
    that alias an input (views, in-place and out= ops) are not new memory and are not counted.
    """

    def __init__(self, device: torch.device):
        super().__init__()
        self.device, self.live, self.peak = device, 0, 0
        self._sizes: dict[int, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        returns = func._schema.returns
        for spec, value in zip(returns, out if len(returns) > 1 else (out,)):
            if spec.alias_info is None:
                for tensor in value if isinstance(value, (list, tuple)) else (value,):
                    if isinstance(tensor, torch.Tensor) and tensor.device == self.device:
                        self._count(tensor.untyped_storage())
        return out

    def _count(self, storage: torch.UntypedStorage) -> None:
        key = id(storage)  # a storage keeps its Python object while alive; the finalizer frees the key
        if key not in self._sizes:
            self._sizes[key] = storage.nbytes()
            self.live += self._sizes[key]
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        self.live -= self._sizes.pop(key)


def resident_bytes(module: EditorTrainer, optimizer: torch.optim.Optimizer) -> int:
    """Bytes live before a step: the LLM's and editor's parameters and buffers, and the optimizer state."""
    model, editor = module.target.model, module.editor
    tensors = [*model.parameters(), *model.buffers(), *editor.parameters(), *editor.buffers()]
    tensors += [v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v)]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


class StepProbe(L.Callback):
    """Times step TIMED; measures the memory of step MEASURED (its peak, and what was live when it began)."""

    def __init__(self):
        self.seconds, self.started = 0.0, 0.0
        self.live_at_start = self.peak = 0
        self.tracker: LiveTensorMemory | None = None

    def on_train_batch_start(self, trainer: L.Trainer, module: EditorTrainer, batch, batch_idx: int) -> None:
        cuda = module.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(module.device)
        if batch_idx == MEASURED and cuda:
            self.live_at_start = torch.cuda.memory_allocated(module.device)
            torch.cuda.reset_peak_memory_stats(module.device)
        elif batch_idx == MEASURED:
            self.live_at_start = resident_bytes(module, trainer.optimizers[0])
            self.tracker = LiveTensorMemory(module.device)
            self.tracker.__enter__()
        self.started = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, module: EditorTrainer, outputs, batch,
                           batch_idx: int) -> None:
        cuda = module.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(module.device)
        if batch_idx == TIMED:
            self.seconds = time.perf_counter() - self.started
        if batch_idx == MEASURED and cuda:
            self.peak = torch.cuda.max_memory_allocated(module.device)
        elif batch_idx == MEASURED:
            self.tracker.__exit__(None, None, None)
            self.peak = self.live_at_start + self.tracker.peak


def compose_config(overrides: list[str]) -> DictConfig:
    with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
        return compose("train", overrides=overrides)


def measure(overrides: list[str]) -> dict:
    """Three training steps of the configured editor: the timed step's seconds, the measured step's memory."""
    cfg = compose_config(overrides)
    L.seed_everything(cfg.seed)
    experiment = build_experiment(cfg)
    editor = build_editor(cfg, experiment)
    objective, sequence_length = build_objective(cfg)
    training = cfg.training
    datamodule = EditStreamDataModule(
        experiment.data.train, experiment.data.eval, experiment.collator,
        edits_per_step=training.edits_per_step, train_num_steps=sequence_length, eval_num_steps=1,
        sequences_per_epoch=MEASURED + 1, seed=cfg.seed)
    module = EditorTrainer(editor, FrozenTarget(experiment.model, experiment.editable), objective,
                           lr=training.lr, grad_clip=training.grad_clip, step_every=training.step_every)
    probe = StepProbe()
    trainer = instantiate(cfg.trainer, max_epochs=1, logger=False, callbacks=[probe], limit_val_batches=0,
                          enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, datamodule=datamodule)
    return {"back_depth": objective.back_depth, "device": str(module.device), "seconds": probe.seconds,
            "step_bytes": probe.peak - probe.live_at_start, "total_bytes": probe.peak}


def run_in_fresh_process(overrides: list[str], threads: int | None) -> dict:
    threads_option = ["--threads", str(threads)] if threads else []
    command = [sys.executable, __file__, "--measure-one", *threads_option, *overrides]
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
    parser.add_argument("--threads", type=int, default=None, help="CPU threads per run")
    parser.add_argument("--measure-one", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides of configs/train.yaml")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.measure_one:
        print(json.dumps(measure(args.overrides)))
        return

    data = args.data or ("synthetic" if args.model == "tiny" else "counterfact")
    length = args.sequence_length or max(args.depths)
    common = [f"model={args.model}", f"data={data}", f"editor.objective.sequence_length={length}",
              *args.overrides]
    print(f"model={args.model} data={data} sequence_length={length} threads={args.threads or 'default'} "
          f"{' '.join(args.overrides)}")
    print(f"{'back_depth':>10} {'step MiB':>10} {'total MiB':>10} {'s/step':>8}")
    rows = []
    for depth in sorted(args.depths):
        row = run_in_fresh_process([*common, f"editor.objective.back_depth={depth}"], args.threads)
        print(f"{depth:>10} {row['step_bytes'] / MiB:>10.1f} {row['total_bytes'] / MiB:>10.1f} "
              f"{row['seconds']:>8.2f}", flush=True)
        rows.append(row)
    first, last = rows[0], rows[-1]
    step_ratio = last["step_bytes"] / first["step_bytes"]
    total_ratio = last["total_bytes"] / first["total_bytes"]
    memory = "cuda max_memory_allocated" if first["device"].startswith("cuda") else "live tensor bytes"
    print(f"device {first['device']}, memory = {memory}; k={last['back_depth']} / k={first['back_depth']}: "
          f"step {step_ratio:.3f}x, total {total_ratio:.3f}x (limit {LIMIT}x)")
    if step_ratio > LIMIT:
        sys.exit(1)


if __name__ == "__main__":
    main()
