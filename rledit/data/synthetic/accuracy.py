"""Teacher-forced token accuracy of a model on the world's true facts: does it know its world?"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerFast

from rledit.data.synthetic.encoding import encode
from rledit.data.synthetic.world import World


@torch.no_grad()
def token_accuracy(model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, prompts: Sequence[str],
                   targets: Sequence[str], batch_size: int = 512) -> list[float]:
    """Per (prompt, target): the fraction of target tokens that are the argmax given the true prefix."""
    device = next(model.parameters()).device
    scores: list[float] = []
    for start in range(0, len(prompts), batch_size):
        batch = encode(tokenizer, prompts[start:start + batch_size], targets[start:start + batch_size])
        logits = model(input_ids=batch.input_ids.to(device)).logits[:, :-1].cpu()
        correct = (logits.argmax(-1) == batch.input_ids[:, 1:]) & batch.target_mask[:, 1:]
        scores.extend((correct.sum(1) / batch.target_mask.sum(1)).tolist())
    return scores


def world_accuracy(model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, world: World,
                   batch_size: int = 512) -> dict[str, float | dict[str, float]]:
    """Token accuracy on the true objects, averaged per (fact, template).

    Returns {"overall": ..., "per_template": {template: ...}} over the paraphrase templates, plus
    "heldout" over the held-out templates (never trained on, so reported, not required to be high).
    """
    heldout = [(relation.render(relation.heldout_template, fact.subject), fact.object, "heldout")
               for fact in world.facts for relation in [world.relation(fact.relation)]]
    items = world.prompts_and_objects() + heldout
    scores = token_accuracy(model, tokenizer, [p for p, _, _ in items], [o for _, o, _ in items], batch_size)
    by_template: dict[str, list[float]] = defaultdict(list)
    for (_, _, template), score in zip(items, scores, strict=True):
        by_template[template].append(score)
    heldout_scores = by_template.pop("heldout")
    trained = [score for template_scores in by_template.values() for score in template_scores]
    return {
        "overall": _mean(trained),
        "per_template": {template: _mean(values) for template, values in by_template.items()},
        "heldout": _mean(heldout_scores),
    }


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)
