"""Invented, pronounceable entity names built from syllables.

The synthetic world must not overlap with anything a tokenizer or a reader already knows, so every
person, city, language, country and company gets a made-up name; a kind-specific ending makes the
kind audible ("Velmish" is a language, "Tarvonia" a country) without making names predictable.
"""

from __future__ import annotations

import random
from collections.abc import Collection

ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z",
          "br", "dr", "gr", "kr", "tr", "th", "sh", "st", "vr", "zh")
NUCLEI = ("a", "e", "i", "o", "u", "ae", "ei", "ou", "y")
CODAS = ("", "", "", "n", "r", "l", "s", "th", "k", "m")

# Endings per kind of entity; the empty ending leaves the syllables as they are.
ENDINGS = {
    "person": ("", "", "", "ix", "ael", "yn", "eth", "ora", "ius"),
    "city": ("mora", "vel", "dun", "holm", "ssa", "gard"),
    "language": ("ish", "ese", "ic", "ari"),
    "country": ("ia", "onia", "avia", "esh"),
    "company": ("", "ex", "ar", "on"),
}


class NameGenerator:
    """Draws names that are unique across every kind and never collide with the `reserved` words.

    One generator must serve the whole world: a person and a city sharing a name would be one token
    with two meanings.
    """

    def __init__(self, rng: random.Random, reserved: Collection[str] = ()):
        self._rng = rng
        self._taken = {word.lower() for word in reserved}

    def draw(self, kind: str, count: int) -> tuple[str, ...]:
        return tuple(self._draw_one(kind) for _ in range(count))

    def _draw_one(self, kind: str) -> str:
        endings = ENDINGS[kind]
        while True:
            syllables = 2 if kind == "person" else self._rng.randint(1, 2)
            ending = self._rng.choice(endings)
            coda_allowed = ending == "" or ending[0] in "aeiouy"
            root = "".join(self._syllable(coda=coda_allowed and i == syllables - 1) for i in range(syllables))
            name = (root + ending).capitalize()
            if len(name) >= 4 and name.lower() not in self._taken:
                self._taken.add(name.lower())
                return name

    def _syllable(self, coda: bool) -> str:
        """A closing consonant only before a vowel or the end keeps names pronounceable: "Torzoth",
        "Velmish", never "Drasstumduyn" or "Kethssa"."""
        coda = self._rng.choice(CODAS) if coda else ""
        return self._rng.choice(ONSETS) + self._rng.choice(NUCLEI) + coda
