"""Fact values as users type them: real names, cities and jobs from large lists, and made-up words.

A model that only ever saw 55 names learns to pick the nearest of them, not to remember what was said
(issue 24: 0 of 135 unseen facts recalled). Training on thousands of values, in every casing, with
random pronounceable strings among them, leaves copying the bytes as the only way to answer.

Values are split by value, not by dialogue: a value is held out when the CRC-32 of its casefolded UTF-8
bytes is 0 modulo 8, whatever list or generator it comes from, so no held-out value (in any casing)
ever occurs in training; the fixed lists of `model.languages` are never held out, as training uses them as
they are (`Curriculum.listed_rate`). The lists come from the `faker` package (the `train` extra), read once.
"""

from __future__ import annotations

import random
import unicodedata
import zlib
from dataclasses import dataclass
from functools import cache

from cellstream.model.languages import CITIES, JOBS, JOBS_FR, NAMES

MAX_VALUE_BYTES = 24
HELDOUT_MODULUS = 8
# Locales whose first names, last names and cities (listed or generated) make the name and city pools.
LOCALES = ("en_US", "en_GB", "en_IE", "fr_FR", "fr_CH", "es_ES", "es_MX", "de_DE", "de_AT", "it_IT", "pt_PT",
           "pt_BR", "nl_NL", "pl_PL", "sv_SE", "da_DK", "fi_FI", "cs_CZ", "tr_TR", "id_ID")
GENERATED_CITIES_PER_LOCALE = 400
GENERATED_SHARE = 0.2  # of the values drawn: made-up words
COMPOUND_NAME_SHARE = 0.15  # of the names drawn from the lists: two joined by a hyphen or a space

SYLLABLE_ONSETS = tuple("b c d f g h j k l m n p r s t v w z br ch dr fl gr kr pl sh st tr th".split())
VOWELS = tuple("a e i o u a e i o ou ai ei ie".split())
CODAS = ("", "", "", "n", "r", "l", "s", "m", "t", "x")


# model.languages' own values, which training dialogues use as they are: never held out.
_FIXED = frozenset(value.casefold() for value in (*NAMES, *CITIES, *JOBS, *JOBS_FR))


def is_heldout(value: str) -> bool:
    """Whether `value` (in any casing) belongs to the evaluation half."""
    folded = value.casefold()
    return folded not in _FIXED and zlib.crc32(folded.encode("utf-8")) % HELDOUT_MODULUS == 0


def fits(value: str) -> bool:
    """1 to 24 UTF-8 bytes of letters, digits, spaces, hyphens, apostrophes or dots, no outer spaces."""
    size = len(value.encode("utf-8"))
    return (1 <= size <= MAX_VALUE_BYTES and value == value.strip() and "  " not in value
            and all(unicodedata.category(ch)[0] in "LN" or ch in "'-. " for ch in value))


def pronounceable(rng: random.Random) -> str:
    """A made-up lowercase word of 1-4 syllables, e.g. "firigi" or "shoultousho"."""
    syllables = rng.choice((1, 2, 2, 3, 3, 4))
    return "".join(rng.choice(SYLLABLE_ONSETS) + rng.choice(VOWELS) + rng.choice(CODAS) for _ in range(syllables))


def typed(value: str, rng: random.Random) -> str:
    """`value` in a casing people type: lowercase, capitalised words, or (rarely) upper case."""
    roll = rng.random()
    if roll < 0.45:
        return value.lower()
    if roll < 0.9:
        return " ".join(word[:1].upper() + word[1:] for word in value.split(" "))
    return value.upper() if roll < 0.95 else value


@cache
def _listed() -> dict[str, tuple[tuple[str, ...], ...]]:
    """Every candidate value of each kind, before the split, in groups drawn with equal chance: one group
    per locale for names and cities (Italy's 16,000 listed towns would otherwise be 3 cities in 4), our own
    lists as one more group; jobs in one group per language."""
    from faker import Faker

    groups: dict[str, list[set[str]]] = {"name": [set(NAMES)], "city": [set(CITIES)], "job_en": [set(JOBS)],
                                         "job_fr": [set(JOBS_FR)]}
    for locale in LOCALES:
        fake = Faker(locale)
        fake.seed_instance(0)
        names, cities = set(), {fake.city() for _ in range(GENERATED_CITIES_PER_LOCALE)}
        for provider in fake.providers:
            names.update(str(value) for attribute in ("first_names", "last_names")
                         for value in getattr(provider, attribute, None) or ())
            cities.update(str(value) for value in getattr(provider, "cities", None) or ())
        groups["name"].append(names)
        groups["city"].append(cities)
    for locale, kind in (("en_US", "job_en"), ("fr_FR", "job_fr")):
        groups[kind][0].update(str(job).lower() for job in Faker(locale).provider("faker.providers.job").jobs)
    return {kind: tuple(tuple(sorted(v for v in group if fits(v))) for group in kind_groups)
            for kind, kind_groups in groups.items()}


@dataclass(frozen=True)
class ValuePool:
    """The training or the held-out values of each kind (jobs per language), and how to draw one."""

    names: tuple[tuple[str, ...], ...]  # groups, drawn with equal chance
    cities: tuple[tuple[str, ...], ...]
    jobs: dict[str, tuple[tuple[str, ...], ...]]
    heldout: bool

    @classmethod
    def load(cls, *, heldout: bool) -> ValuePool:
        listed = _listed()

        def half(kind: str) -> tuple[tuple[str, ...], ...]:
            groups = (tuple(v for v in group if is_heldout(v) == heldout) for group in listed[kind])
            return tuple(group for group in groups if group)

        return cls(half("name"), half("city"), {"en": half("job_en"), "fr": half("job_fr")}, heldout)

    def listed(self, kind: str, language: str) -> tuple[tuple[str, ...], ...]:
        return {"name": self.names, "city": self.cities}.get(kind) or self.jobs[language]

    def size(self, kind: str, language: str = "en") -> int:
        """How many listed values of `kind` there are to draw from."""
        return sum(len(group) for group in self.listed(kind, language))

    def draw(self, kind: str, language: str, rng: random.Random) -> str:
        """A value of `kind` as a user would type it: listed (names sometimes compound) or made up, with
        GENERATED_SHARE made up in either half (a candidate on the other half's side is drawn again alike)."""
        made_up = rng.random() < GENERATED_SHARE
        while True:
            value = self._made_up(rng) if made_up else self._listed(kind, language, rng)
            value = typed(value, rng)
            if fits(value) and is_heldout(value) == self.heldout:
                return value

    def _listed(self, kind: str, language: str, rng: random.Random) -> str:
        value = rng.choice(rng.choice(self.listed(kind, language)))
        if kind == "name" and rng.random() < COMPOUND_NAME_SHARE:
            value += rng.choice("- ") + rng.choice(rng.choice(self.names))
        return value

    @staticmethod
    def _made_up(rng: random.Random) -> str:
        value = pronounceable(rng)
        if rng.random() < COMPOUND_NAME_SHARE:
            value += rng.choice("- ") + pronounceable(rng)
        return value
