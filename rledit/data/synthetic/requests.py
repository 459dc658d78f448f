"""Counterfactual edit requests drawn from the synthetic world's facts."""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from typing import Protocol

from rledit.data.records import EditRecord, LocalityPair
from rledit.data.synthetic.relations import Relation
from rledit.errors import ConfigError


class Facts(Protocol):
    """What requests are drawn from (the World has it): subjects, relations, object pools, true objects."""

    subjects: Sequence[str]
    relations: Sequence[Relation]
    objects: Mapping[str, Sequence[str]]

    def true_object(self, subject: str, relation: str) -> str: ...


def build_edit_requests(world: Facts, subjects: Sequence[str], seed: int, locality_per_request: int,
                        locality_subjects: Sequence[str] | None) -> list[EditRecord]:
    """One request per (subject, relation): a new object from the relation's pool, asked through one
    template, rephrased through the relation's other templates, with locality prompts about other subjects.

    The first locality prompt of each request asks the edited relation (the neighbourhood an edit is
    most likely to spill into), the others ask random relations.
    """
    unknown = sorted(set(subjects) - set(world.subjects))
    if unknown:
        raise ConfigError(f"edit_requests got subjects that are not in the world: {unknown[:5]}")
    edited = set(subjects)
    candidates = world.subjects if locality_subjects is None else locality_subjects
    pool = [subject for subject in candidates if subject not in edited]
    if not 0 <= locality_per_request <= len(pool):
        raise ConfigError(f"locality_per_request={locality_per_request} must be >= 0 and at most the "
                          f"{len(pool)} locality subjects that are not edited")
    rng = random.Random(f"edit-requests-{seed}")
    pairs = [(subject, relation) for subject in subjects for relation in world.relations]
    rng.shuffle(pairs)
    requests = []
    for subject, relation in pairs:
        true_object = world.true_object(subject, relation.name)
        prompt_index = rng.randrange(len(relation.templates))
        others = rng.sample(pool, locality_per_request)
        other_relations = [relation, *(rng.choice(world.relations) for _ in others[1:])]
        locality = tuple(_true_fact_prompt(world, other, other_relation, rng)
                         for other, other_relation in zip(others, other_relations, strict=True))
        requests.append(EditRecord(
            record_id=f"{subject}:{relation.name}",
            prompt=relation.render(relation.templates[prompt_index], subject),
            target_new=rng.choice([o for o in world.objects[relation.name] if o != true_object]),
            target_true=true_object,
            subject=subject,
            rephrase_prompts=tuple(relation.render(template, subject)
                                   for i, template in enumerate(relation.templates) if i != prompt_index),
            locality=locality,
        ))
    return requests


def _true_fact_prompt(world: Facts, subject: str, relation: Relation, rng: random.Random) -> LocalityPair:
    return LocalityPair(prompt=relation.render(rng.choice(relation.templates), subject),
                        answer=world.true_object(subject, relation.name))
