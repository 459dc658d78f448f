"""A generated fact base: invented subjects, each with one object per relation, deterministic from a seed.

The world is the project's embedded default data: it needs no download, its facts are known exactly,
and a model pretrained on it knows them, so edits on it are measurable on any machine.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from rledit.data.records import EditRecord
from rledit.data.synthetic.names import NameGenerator
from rledit.data.synthetic.options import config_from_mapping
from rledit.data.synthetic.relations import MAX_OBJECTS_PER_RELATION, RELATIONS, Relation, fixed_words
from rledit.data.synthetic.requests import build_edit_requests
from rledit.errors import ConfigError, DataError

# Bump when generation changes, so cached models of an older world are not mistaken for this one.
WORLD_FORMAT = 1


@dataclass(frozen=True)
class WorldConfig:
    """What the generated world looks like; the same config always gives the same world."""

    seed: int = 0
    num_subjects: int = 300
    objects_per_relation: int = 16
    subject_words: int = 1       # 2: "Given Family" names whose words each recur in several subjects, so a model
                                 # must compose the subject from both (as real models do over subword tokens)

    def __post_init__(self):
        if self.subject_words not in (1, 2):
            raise ConfigError(f"world.subject_words must be 1 or 2, got {self.subject_words}")
        if self.num_subjects < 3:
            raise ConfigError(f"world.num_subjects must be >= 3 (edits need other subjects for "
                              f"locality prompts), got {self.num_subjects}")
        if not 2 <= self.objects_per_relation <= MAX_OBJECTS_PER_RELATION:
            raise ConfigError(f"world.objects_per_relation must be in [2, {MAX_OBJECTS_PER_RELATION}] "
                              f"(a counterfactual needs a second object), got {self.objects_per_relation}")



@dataclass(frozen=True)
class Fact:
    subject: str
    relation: str
    object: str


@dataclass(frozen=True)
class SubjectSplit:
    """Disjoint subject sets, so a training stream never edits a subject the evaluation stream edits."""

    train: tuple[str, ...]
    eval: tuple[str, ...]


def split_subjects(subjects: Sequence[str], eval_fraction: float, seed: int) -> SubjectSplit:
    """A seeded split of `subjects` into disjoint training and evaluation sets (the given share evaluates)."""
    num_eval = round(len(subjects) * eval_fraction)
    if not 0 < num_eval < len(subjects):
        raise ConfigError(f"a fraction of {eval_fraction} leaves no subjects on one side of the split "
                          f"of {len(subjects)} subjects")
    shuffled = list(subjects)
    random.Random(f"split-subjects-{seed}").shuffle(shuffled)
    return SubjectSplit(train=tuple(shuffled[num_eval:]), eval=tuple(shuffled[:num_eval]))


@dataclass(frozen=True)
class World:
    """The generated facts, their phrasings, and the edit requests and held-out text drawn from them."""

    config: WorldConfig
    subjects: tuple[str, ...]
    relations: tuple[Relation, ...]
    objects: Mapping[str, tuple[str, ...]]
    facts: tuple[Fact, ...]

    @cached_property
    def _objects_by_fact(self) -> dict[tuple[str, str], str]:
        return {(fact.subject, fact.relation): fact.object for fact in self.facts}

    @cached_property
    def _relations_by_name(self) -> dict[str, Relation]:
        return {relation.name: relation for relation in self.relations}

    def relation(self, name: str) -> Relation:
        try:
            return self._relations_by_name[name]
        except KeyError:
            known = sorted(self._relations_by_name)
            raise ConfigError(f"unknown relation '{name}'; known: {known}") from None

    def true_object(self, subject: str, relation: str) -> str:
        try:
            return self._objects_by_fact[subject, relation]
        except KeyError:
            raise ConfigError(f"the world has no fact for subject '{subject}' and relation "
                              f"'{relation}'") from None

    def prompts_and_objects(self) -> list[tuple[str, str, str]]:
        """(prompt, true object, template) for every fact in every paraphrase template: pretraining data."""
        pairs = []
        for fact in self.facts:
            relation = self.relation(fact.relation)
            pairs.extend((relation.render(template, fact.subject), fact.object, template)
                         for template in relation.templates)
        return pairs

    def texts(self) -> list[str]:
        """Every piece of text the world can produce (templates without their slot), for the vocabulary."""
        templates = [relation.render(template, " ") for relation in self.relations
                     for template in (*relation.templates, relation.heldout_template)]
        objects = [o for pool in self.objects.values() for o in pool]
        return [*templates, *self.subjects, *objects]

    def split_subjects(self, eval_fraction: float = 0.5, seed: int = 0) -> SubjectSplit:
        """A seeded split of the subjects into disjoint training and evaluation sets."""
        return split_subjects(self.subjects, eval_fraction, seed)

    def edit_requests(self, subjects: Sequence[str], seed: int = 0, locality_per_request: int = 3,
                      locality_subjects: Sequence[str] | None = None) -> list[EditRecord]:
        """One counterfactual edit per (subject, relation) of `subjects`, in a seeded order.

        Locality prompts come from `locality_subjects` (by default every subject not being edited), so
        their true answers stay true however many of these requests are committed.
        """
        return build_edit_requests(self, subjects, seed, locality_per_request, locality_subjects)

    def heldout_sentences(self, n: int, seed: int = 0) -> list[str]:
        """`n` true facts phrased in their relation's held-out template, for perplexity.

        Pretraining never saw these phrasings, but they use only words it saw, so perplexity is finite and
        reflects general knowledge of the world rather than memorised sentences.
        """
        if not 0 < n <= len(self.facts):
            raise ConfigError(f"heldout_sentences needs 0 < n <= {len(self.facts)} (the number of facts), "
                              f"got {n}")
        sentences = []
        for fact in random.Random(f"heldout-{seed}").sample(self.facts, n):
            relation = self.relation(fact.relation)
            sentences.append(f"{relation.render(relation.heldout_template, fact.subject)} {fact.object}")
        return sentences

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": WORLD_FORMAT,
            "config": asdict(self.config),
            "subjects": list(self.subjects),
            "relations": [asdict(relation) for relation in self.relations],
            "objects": {name: list(pool) for name, pool in self.objects.items()},
            "facts": [[f.subject, f.relation, f.object] for f in self.facts],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str | None = None) -> World:
        if data.get("format") != WORLD_FORMAT:
            raise DataError(f"synthetic world format {data.get('format')!r}, this version reads "
                            f"{WORLD_FORMAT}", source=source, field="format")
        for key in ("config", "subjects", "relations", "objects", "facts"):
            if key not in data:
                raise DataError("missing field of a synthetic world", source=source, field=key)
        return cls(
            config=config_from_mapping(WorldConfig, data["config"], "world"),
            subjects=tuple(data["subjects"]),
            relations=tuple(Relation(r["name"], tuple(r["templates"]), r["heldout_template"])
                            for r in data["relations"]),
            objects={name: tuple(pool) for name, pool in data["objects"].items()},
            facts=tuple(Fact(*fact) for fact in data["facts"]),
        )

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, path: Path) -> World:
        return cls.from_dict(json.loads(Path(path).read_text()), source=str(path))


def build_world(config: WorldConfig | Mapping[str, Any] | None = None) -> World:
    """Generate the world of `config`: names first, then each relation's objects, then the facts."""
    config = as_world_config(config)
    rng = random.Random(f"rledit-world-{config.seed}")
    names = NameGenerator(rng, reserved=fixed_words())
    subjects = _draw_subjects(names, rng, config)
    objects = {relation.name: pool.draw(config.objects_per_relation, rng, names)
               for relation, pool in RELATIONS}
    facts = tuple(Fact(subject, relation.name, rng.choice(objects[relation.name]))
                  for subject in subjects for relation, _ in RELATIONS)
    return World(config=config, subjects=subjects, relations=tuple(r for r, _ in RELATIONS),
                 objects=objects, facts=facts)


def _draw_subjects(names: NameGenerator, rng: random.Random, config: WorldConfig) -> tuple[str, ...]:
    if config.subject_words == 1:
        return names.draw("person", config.num_subjects)
    # Pools of about 2 sqrt(N) words each: every given and family name recurs in several subjects.
    pool_size = math.ceil(2 * math.sqrt(config.num_subjects))
    given, family = names.draw("person", pool_size), names.draw("person", pool_size)
    pairs = rng.sample([(g, f) for g in given for f in family], config.num_subjects)
    return tuple(f"{g} {f}" for g, f in pairs)


def as_world_config(config: WorldConfig | Mapping[str, Any] | None) -> WorldConfig:
    """Accept a config object, a plain mapping (as Hydra passes it) or None for the default world."""
    if config is None:
        return WorldConfig()
    if isinstance(config, WorldConfig):
        return config
    return config_from_mapping(WorldConfig, config, "world")
