"""Data-parallel training: two CPU processes (gloo, `trainer=ddp`) train the editor as one process would.

The test launches this file as a script (`python -m tests.test_ddp OUT`), so pytest itself is never forked;
Lightning's DDP launcher starts the second rank. Each rank writes which training sequences it rolled and
its final editor state; the tests check the ranks rolled disjoint sequences, hold identical editors,
match a hand-rolled single-process loop that averages the gradients of the same sequence pairs, and pool
their normalizers' observations.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from transformers import LlamaConfig, LlamaForCausalLM

from rledit.data.collate import EditCollator
from rledit.data.streams import EditStreamDataModule
from rledit.editors.normalizer import RunningNormalizer
from rledit.editors.ridge import RidgeEditor
from rledit.models.layers import resolve_edit_modules
from rledit.training.command import close_ranks
from rledit.training.module import EditorTrainer, FrozenTarget, StatisticsPooling
from rledit.training.rollout import Objective, rollout
from tests.test_collate import build_word_tokenizer
from tests.test_training import WORDS, make_records

ROOT = Path(__file__).resolve().parents[1]
WORLD_SIZE, EPOCHS, SEQUENCES_PER_EPOCH = 2, 2, 2   # one sequence per rank and epoch: two optimizer steps
OBJECTIVE = Objective(back_depth=2, decay=0.9, locality_weight=0.5, norm_penalty=1e-3)
LR, GRAD_CLIP = 1e-2, 1.0


def build(normalize: bool) -> tuple[EditorTrainer, EditStreamDataModule]:
    """A tiny random Llama, an RLEdit editor, 3-step sequences of 2 edits; the same in every process."""
    torch.manual_seed(0)
    records, tokenizer = make_records(24), build_word_tokenizer(WORDS)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=32)).eval().requires_grad_(False)
    editable = resolve_edit_modules(model, "model.layers.{1-2}.mlp.{gate_proj,up_proj}")
    shapes = {name: (em.d_out, em.d_in) for name, em in editable.items()}
    editor = RidgeEditor(shapes, rank=8, normalize=normalize)
    datamodule = EditStreamDataModule(records[:18], records[18:], EditCollator(tokenizer),
                                      edits_per_step=2, train_num_steps=3, eval_num_steps=1,
                                      sequences_per_epoch=SEQUENCES_PER_EPOCH, seed=0)
    module = EditorTrainer(editor, FrozenTarget(model, editable), OBJECTIVE, lr=LR, grad_clip=GRAD_CLIP)
    return module, datamodule


class SequenceRecorder(L.Callback):
    """Records the number of every training sequence this process rolls (recognised by its record ids) and
    the gradient norm of each optimizer step (after averaging, before clipping).
    """

    def __init__(self, datamodule: EditStreamDataModule):
        streams = [datamodule.train_sequences.stream(n) for n in range(EPOCHS * SEQUENCES_PER_EPOCH)]
        self.number = {self.record_ids(stream.steps): n for n, stream in enumerate(streams)}
        self.seen: list[int] = []
        self.grad_norms: list[float] = []

    @staticmethod
    def record_ids(steps) -> tuple[str, ...]:
        return tuple(record.record_id for step in steps for record in step)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.seen.append(self.number[self.record_ids([step.records for step in batch])])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.grad_norms.append(float(trainer.callback_metrics["train/grad_norm"]))


def ddp_trainer(out: Path, callback: L.Callback) -> L.Trainer:
    """The Trainer of `trainer=ddp` from configs/, on CPU, without validation, logging or checkpoints."""
    with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=[
            "trainer=ddp", "trainer.accelerator=cpu", f"trainer.max_epochs={EPOCHS}",
            "trainer.enable_progress_bar=false", "trainer.enable_checkpointing=false",
            "+trainer.limit_val_batches=0", "+trainer.enable_model_summary=false"])
    return instantiate(cfg.trainer, default_root_dir=str(out), logger=False, callbacks=[callback])


def pooling_rows() -> torch.Tensor:
    """12 rows: 3 observed by every rank, then 4 by rank 0 only and 5 by rank 1 only."""
    return torch.randn(12, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 3 + 1


def pooled_statistics(rank: int) -> dict[str, torch.Tensor]:
    """Common rows, then different rows on each rank, pooled: as if one normalizer had seen them all."""
    rows = pooling_rows()
    normalizer = RunningNormalizer(rows.shape[1])
    normalizer.observe(rows[:3])
    pooling = StatisticsPooling([normalizer])
    normalizer.observe((rows[3:7], rows[7:])[rank])
    pooling.pool()
    return normalizer.state_dict()


def main(out: Path) -> None:
    """Each rank: train without, then with normalization, then pool known statistics; save all of it."""
    results = {}
    for normalize in (False, True):
        module, datamodule = build(normalize)
        recorder = SequenceRecorder(datamodule)
        trainer = ddp_trainer(out, recorder)
        trainer.fit(module, datamodule=datamodule)
        results[f"normalize={normalize}"] = {"seen": recorder.seen, "grad_norms": recorder.grad_norms,
                                           "state": module.editor.state_dict()}
    results["pooled"] = pooled_statistics(trainer.global_rank)
    torch.save(results, out / f"rank{trainer.global_rank}.pt")
    close_ranks(trainer)  # rank 0 exits only once every rank has written its results


def reference_training(normalize: bool, schedule: list[tuple[int, ...]]) -> tuple[dict, list[float]]:
    """One process: per optimizer step, roll each sequence of the step's tuple and average their gradients.

    Returns the final editor state and each step's gradient norm before clipping.
    """
    module, datamodule = build(normalize)
    editor, target = module.editor, module.target
    with torch.no_grad():  # the calibration EditorTrainer.on_fit_start makes
        editor.predict_update(target.model, target.modules, datamodule.train_sequences[0][0].edit)
    optimizer = module.configure_optimizers()
    params = [p for p in editor.parameters() if p.requires_grad]
    editor.train()
    grad_norms = []
    for sequences in schedule:
        for n in sequences:
            steps = datamodule.train_sequences[n]
            rollout(editor, target.model, target.modules, target.ledger, steps, OBJECTIVE)
        for p in params:
            p.grad /= len(sequences)
        grad_norms.append(float(torch.nn.utils.clip_grad_norm_(params, GRAD_CLIP)))
        optimizer.step()
        optimizer.zero_grad()
    return editor.state_dict(), grad_norms


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """What each rank of one two-process launch of `main` saved."""
    out = tmp_path_factory.mktemp("ddp")
    launched = subprocess.run([sys.executable, "-m", "tests.test_ddp", str(out)], cwd=ROOT, check=False,
                              capture_output=True, text=True, timeout=300)
    assert launched.returncode == 0, launched.stdout[-3000:] + launched.stderr[-3000:]
    return [torch.load(out / f"rank{rank}.pt", weights_only=True) for rank in range(WORLD_SIZE)]


@pytest.mark.parametrize("run", ["normalize=False", "normalize=True"])
def test_ranks_roll_disjoint_sequences_and_end_identical(ranks: list[dict], run: str):
    seen = [rank[run]["seen"] for rank in ranks]
    # the same number on each rank, disjoint, and both epochs' sequences (set_epoch reaches our sampler)
    assert [len(s) for s in seen] == [EPOCHS * SEQUENCES_PER_EPOCH // WORLD_SIZE] * WORLD_SIZE
    assert sorted(n for s in seen for n in s) == list(range(EPOCHS * SEQUENCES_PER_EPOCH))
    first, second = (rank[run]["state"] for rank in ranks)
    assert first.keys() == second.keys()
    for name in first:  # parameters and buffers (normalizer statistics)
        assert torch.equal(first[name], second[name]), f"{run}: the ranks' editors differ in {name}"


def test_ddp_training_equals_one_process_averaging_the_same_sequence_pairs(ranks: list[dict]):
    run = "normalize=False"  # with normalization the order of observations differs (see the next test)
    schedule = list(zip(*(rank[run]["seen"] for rank in ranks)))
    reference, reference_norms = reference_training(False, schedule)
    torch.testing.assert_close(ranks[0][run]["grad_norms"], reference_norms, rtol=1e-4, atol=0)
    trained, initial = ranks[0][run]["state"], build(normalize=False)[0].editor.state_dict()  # it did train:
    assert any(not torch.allclose(trained[n], initial[n], atol=1e-4) for n in initial if "nets" in n)
    for name in reference:
        torch.testing.assert_close(trained[name], reference[name], rtol=1e-4, atol=1e-6, msg=name)


def test_ddp_pools_every_ranks_normalizer_observations(ranks: list[dict]):
    run = "normalize=True"
    reference, _ = reference_training(True, list(zip(*(rank[run]["seen"] for rank in ranks))))
    counts = {name: int(v) for name, v in ranks[0][run]["state"].items() if name.endswith(".count")}
    assert counts and counts == {name: int(reference[name]) for name in counts} and min(counts.values()) > 0

    expected = RunningNormalizer(6)
    expected.observe(pooling_rows())
    for rank in ranks:
        for name, value in expected.state_dict().items():
            torch.testing.assert_close(rank["pooled"][name], value, rtol=1e-12, atol=1e-12, msg=name)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
