"""Build the tiny Llama of the synthetic world and pretrain it on every fact in every paraphrase.

Seeded, and built not to depend on how the CPU rounds (see `portable`): the same world, model and
training config give the same weights. Training runs a cosine schedule, then holds its floor rate until
every trained template reaches `target_accuracy`, up to `max_epochs`, and a model that cannot get there
is an error, never a quietly weaker model.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from rledit.data.synthetic.accuracy import world_accuracy
from rledit.data.synthetic.encoding import encode
from rledit.data.synthetic.options import config_from_mapping
from rledit.data.synthetic.portable import portable_llama, snap_, standard_llama
from rledit.data.synthetic.world import World
from rledit.errors import ConfigError, PretrainingError
from rledit.threads import cpu_threads

# Bump when training changes, so models cached by an older trainer are not reused.
PRETRAIN_FORMAT = 3

# A real (if small) transformer: editors edit the gate_proj / up_proj of its middle and late layers.
DEFAULT_MODEL: dict[str, Any] = {
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 64,
    "tie_word_embeddings": False,
}

# Set by the tokenizer, never by the user.
_TOKENIZER_OWNED = ("vocab_size", "bos_token_id", "eos_token_id", "pad_token_id")


@dataclass(frozen=True)
class PretrainConfig:
    """Optimisation of the world model: `epochs` of warmup and cosine decay to `floor_fraction` of the
    peak rate, then more epochs at that floor until the model knows its world, `max_epochs` in all."""

    seed: int = 0
    epochs: int = 12
    max_epochs: int = 24
    # Every trained template's token accuracy must reach this (so the facts' overall accuracy does too).
    target_accuracy: float = 0.98
    floor_fraction: float = 0.1
    batch_size: int = 128
    learning_rate: float = 1.5e-3
    weight_decay: float = 0.0
    warmup_fraction: float = 0.05
    # One thread: this model's matmuls are too small to gain much from more, and a shared CPU makes
    # extra threads spin (the weights are the same for any count).
    threads: int = 1

    def __post_init__(self):
        if self.epochs < 1 or self.batch_size < 1 or self.threads < 1:
            raise ConfigError(f"training.epochs, batch_size and threads must be >= 1, got {self}")
        if self.max_epochs < self.epochs:
            raise ConfigError(f"training.max_epochs must be >= epochs, got max_epochs={self.max_epochs} "
                              f"and epochs={self.epochs}")
        if not self.learning_rate > 0 or not 0 <= self.warmup_fraction < 1:
            raise ConfigError(f"training.learning_rate must be > 0 and warmup_fraction in [0, 1), got {self}")
        if not 0 < self.floor_fraction <= 1 or not 0 <= self.target_accuracy <= 1:
            raise ConfigError(f"training.floor_fraction must be in (0, 1] and target_accuracy in [0, 1], "
                              f"got {self}")


@dataclass(frozen=True)
class PretrainReport:
    """How pretraining went: wall time (optimisation and the accuracy checks), and the accuracy reached."""

    seconds: float
    steps: int
    epochs: int
    final_loss: float
    accuracy: dict[str, Any] = field(default_factory=dict)


def training_config(values: PretrainConfig | Mapping[str, Any] | None) -> PretrainConfig:
    if isinstance(values, PretrainConfig):
        return values
    return config_from_mapping(PretrainConfig, values, "training")


def check_model_overrides(overrides: Mapping[str, Any] | None) -> dict[str, Any]:
    """Reject options LlamaConfig does not have (it would silently keep them) and the tokenizer's own."""
    overrides = dict(overrides or {})
    allowed = set(LlamaConfig().to_dict()) - set(_TOKENIZER_OWNED)
    unknown = sorted(set(overrides) - allowed)
    if unknown:
        raise ConfigError(f"unknown or fixed model option(s) {unknown}; {list(_TOKENIZER_OWNED)} come from "
                          f"the world's tokenizer")
    return overrides


def model_config(tokenizer: PreTrainedTokenizerFast,
                 overrides: Mapping[str, Any] | None = None) -> LlamaConfig:
    """The default architecture with `overrides` on top; vocabulary and special ids from the tokenizer."""
    return LlamaConfig(**{**DEFAULT_MODEL, **check_model_overrides(overrides)}, vocab_size=len(tokenizer),
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id)


def pretrain(world: World, tokenizer: PreTrainedTokenizerFast, config: LlamaConfig,
             training: PretrainConfig, progress: bool = True) -> tuple[LlamaForCausalLM, PretrainReport]:
    """Train a fresh model on "template(subject) object</s>" for every fact and template until every
    template's accuracy on the true objects reaches `training.target_accuracy`. Returns the model in
    eval mode and the report; raises PretrainingError if `training.max_epochs` were not enough."""
    with cpu_threads(training.threads), torch.random.fork_rng(devices=[]):  # the caller's RNG is left alone
        model, report = _train(world, tokenizer, config, training, progress)
    worst_template, worst = min(report.accuracy["per_template"].items(), key=lambda item: item[1])
    if worst < training.target_accuracy:
        raise PretrainingError(
            f"the synthetic world model reached token accuracy {worst:.4f} on template {worst_template!r} "
            f"(overall {report.accuracy['overall']:.4f}) after {report.epochs} epochs, below "
            f"training.target_accuracy={training.target_accuracy}; raise training.max_epochs "
            f"(now {training.max_epochs}) or training.learning_rate")
    return model, report


def _train(world: World, tokenizer: PreTrainedTokenizerFast, config: LlamaConfig, training: PretrainConfig,
           progress: bool) -> tuple[LlamaForCausalLM, PretrainReport]:
    torch.manual_seed(training.seed)
    model = portable_llama(config)
    prompts, objects, _ = zip(*world.prompts_and_objects(), strict=True)
    batch = encode(tokenizer, prompts, objects, append_eos=True)
    labels = _without_subjects(batch.labels(), tokenizer, world)
    steps_per_epoch = math.ceil(len(prompts) / training.batch_size)
    cosine_steps = steps_per_epoch * training.epochs
    optimizer = torch.optim.AdamW(model.parameters(), lr=training.learning_rate,
                                  weight_decay=training.weight_decay, betas=(0.9, 0.98))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _warmup_cosine_floor(
        max(1, round(training.warmup_fraction * cosine_steps)), cosine_steps, training.floor_fraction))
    shuffler = torch.Generator().manual_seed(training.seed)
    started = time.perf_counter()
    loss = torch.tensor(float("nan"))
    accuracy: dict[str, Any] = {}
    epoch = 0
    with tqdm(total=cosine_steps, desc="pretraining the synthetic world model", disable=not progress) as bar:
        while epoch < training.max_epochs:
            model.train()
            for rows in torch.randperm(len(prompts), generator=shuffler).split(training.batch_size):
                width = int(batch.lengths[rows].max())
                # the loss taken here: the model's own `labels=` loss casts the logits to float32
                logits = model(input_ids=batch.input_ids[rows, :width]).logits[:, :-1]
                loss = F.cross_entropy(logits.flatten(0, 1), labels[rows, 1:width].flatten(), ignore_index=-100)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                snap_(model.parameters())
                schedule.step()
                bar.update()
                bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
            epoch += 1
            if epoch < training.epochs:
                continue
            model.eval()
            accuracy = world_accuracy(model, tokenizer, world)
            worst = min(accuracy["per_template"].values())
            bar.set_postfix(loss=f"{loss.item():.3f}", worst_template=f"{worst:.3f}")
            if worst >= training.target_accuracy:
                break
            if epoch < training.max_epochs:  # one more epoch at the floor rate
                bar.total += steps_per_epoch
                bar.refresh()
    model = standard_llama(model, config).eval()
    report = PretrainReport(seconds=time.perf_counter() - started, steps=epoch * steps_per_epoch, epochs=epoch,
                            final_loss=loss.item(), accuracy=accuracy)
    return model, report


def _without_subjects(labels: torch.Tensor, tokenizer: PreTrainedTokenizerFast, world: World) -> torch.Tensor:
    """Subject names are drawn at random, so predicting them is irreducible noise; leaving them out of
    the loss lets the budget go to memorising the facts."""
    subject_ids = torch.tensor(tokenizer.convert_tokens_to_ids(list(world.subjects)))
    return labels.masked_fill(torch.isin(labels, subject_ids), -100)


def _warmup_cosine_floor(warmup_steps: int, cosine_steps: int, floor: float) -> Callable[[int], float]:
    """Linear warmup, cosine decay to `floor` at `cosine_steps`, then `floor` for as long as training runs."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, cosine_steps - warmup_steps))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    return factor


