"""The relations of the synthetic world: how each is phrased and where its objects come from.

Every relation has several paraphrase templates (pretraining sees all of them, so an edit made through
one phrasing can be checked through the others) and one held-out template that pretraining never
sees. Held-out templates reuse only words of the trained templates, so perplexity on them is finite
and measures how well the model generalises, which an edit should not damage.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from rledit.data.synthetic.names import NameGenerator

SUBJECT_SLOT = "{s}"


@dataclass(frozen=True)
class Relation:
    """A relation's name, its paraphrase templates and its held-out template, each with a `{s}` slot."""

    name: str
    templates: tuple[str, ...]
    heldout_template: str

    def render(self, template: str, subject: str) -> str:
        return template.replace(SUBJECT_SLOT, subject)


@dataclass(frozen=True)
class ObjectPool:
    """How a relation's objects are made: a sample of fixed phrases, or invented names.

    Invented names may get a fixed first word (`prefixes`, on a `prefix_share` of them) or always a
    second word (`suffixes`), so that multi-token objects exist.
    """

    phrases: tuple[str, ...] = ()
    invented_kind: str | None = None
    prefixes: tuple[str, ...] = ()
    prefix_share: float = 0.0
    suffixes: tuple[str, ...] = ()

    @property
    def capacity(self) -> int | None:
        """The most objects this pool can give, or None when names are invented on demand."""
        return None if self.invented_kind is not None else len(self.phrases)

    def draw(self, count: int, rng: random.Random, names: NameGenerator) -> tuple[str, ...]:
        if self.invented_kind is None:
            return tuple(rng.sample(self.phrases, count))
        objects = []
        for name in names.draw(self.invented_kind, count):
            if self.prefixes and rng.random() < self.prefix_share:
                name = f"{rng.choice(self.prefixes)} {name}"
            if self.suffixes:
                name = f"{name} {rng.choice(self.suffixes)}"
            objects.append(name)
        return tuple(objects)


OCCUPATIONS = ("baker", "carpenter", "teacher", "nurse", "farmer", "lawyer", "pilot", "chemist",
               "sailor", "painter", "tailor", "plumber", "librarian", "architect", "ship captain",
               "bus driver", "police officer", "bank clerk", "tax advisor", "data analyst",
               "museum guide", "train conductor", "street vendor", "night porter")
SPORTS = ("tennis", "football", "cricket", "rugby", "golf", "hockey", "boxing", "rowing", "cycling",
          "fencing", "archery", "skiing", "swimming", "wrestling", "volleyball", "basketball",
          "water polo", "ice hockey", "table tennis", "beach volleyball", "figure skating",
          "long jump", "rock climbing", "horse racing")
INSTRUMENTS = ("violin", "cello", "harp", "flute", "oboe", "trumpet", "piano", "drums", "banjo",
               "organ", "clarinet", "trombone", "tuba", "ukulele", "accordion", "bagpipes",
               "mandolin", "saxophone", "bass guitar", "electric guitar", "double bass",
               "french horn", "steel drums", "pipe organ")
COLOURS = ("red", "blue", "green", "yellow", "orange", "purple", "pink", "brown", "black", "white",
           "grey", "violet", "teal", "crimson", "amber", "dark green", "light blue", "deep red",
           "pale yellow", "navy blue", "bright orange", "olive green", "sky blue", "rose pink")

# (relation, object pool) in a fixed order: the world's generator walks them in this order.
RELATIONS: tuple[tuple[Relation, ObjectPool], ...] = (
    (Relation("city_of_residence",
              ("{s} lives in the city of", "The home city of {s} is", "{s} resides in"),
              "The city of {s} is"),
     ObjectPool(invented_kind="city", prefixes=("Port", "Upper", "Lower"), prefix_share=0.25)),
    (Relation("native_language",
              ("The native language of {s} is", "{s} speaks the language", "{s} grew up speaking"),
              "The language of {s} is"),
     ObjectPool(invented_kind="language")),
    (Relation("occupation",
              ("{s} works as a", "The occupation of {s} is", "{s} earns a living as a"),
              "{s} is employed as a"),
     ObjectPool(phrases=OCCUPATIONS)),
    (Relation("employer",
              ("{s} is employed by", "The employer of {s} is", "{s} works for the company"),
              "The company of {s} is"),
     ObjectPool(invented_kind="company", suffixes=("Works", "Labs", "Guild", "Foundry", "Mills",
                                                   "Bank", "Studios", "Shipyards"))),
    (Relation("sport",
              ("{s} plays the sport of", "The favourite sport of {s} is", "{s} competes in"),
              "The sport of {s} is"),
     ObjectPool(phrases=SPORTS)),
    (Relation("instrument",
              ("{s} plays the instrument", "The favourite instrument of {s} is",
               "{s} makes music on the"),
              "The instrument of {s} is"),
     ObjectPool(phrases=INSTRUMENTS)),
    (Relation("birth_country",
              ("{s} was born in the country of", "The country of birth of {s} is",
               "{s} is a native of"),
              "The country of {s} is"),
     ObjectPool(invented_kind="country")),
    (Relation("favourite_colour",
              ("The favourite colour of {s} is", "{s} likes the colour", "{s} always dresses in"),
              "The colour of {s} is"),
     ObjectPool(phrases=COLOURS)),
)

MAX_OBJECTS_PER_RELATION = min(pool.capacity for _, pool in RELATIONS if pool.capacity is not None)


def fixed_words() -> frozenset[str]:
    """Every word the relations themselves use (templates, real-word objects, name prefixes and
    suffixes): an invented name must never coincide with one of them."""
    texts = [text.replace(SUBJECT_SLOT, " ") for relation, pool in RELATIONS
             for text in (*relation.templates, relation.heldout_template, *pool.phrases, *pool.prefixes,
                          *pool.suffixes)]
    return frozenset(word for text in texts for word in text.split())
