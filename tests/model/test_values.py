"""Fact values as users type them (model/values.py): two disjoint pools, large, varied, deterministic."""

import random
import re
from collections import Counter

import pytest

from cellstream.model.languages import CITIES, JOBS, JOBS_FR, KINDS, LANGUAGES, NAMES
from cellstream.model.values import MAX_VALUE_BYTES, ValuePool, fits, is_heldout, pronounceable, typed

DRAWS = 1500  # per pool, kind and language


@pytest.fixture(scope="module")
def pools() -> dict[bool, ValuePool]:
    return {heldout: ValuePool.load(heldout=heldout) for heldout in (False, True)}


@pytest.fixture(scope="module")
def drawn(pools) -> dict[tuple[bool, str, str], list[str]]:
    """DRAWS values of every (held out?, kind, language), one seeded stream each."""
    return {(heldout, kind, language): [pool.draw(kind, language, rng) for _ in range(DRAWS)]
            for heldout, pool in pools.items() for kind in KINDS for language in LANGUAGES
            for rng in [random.Random(f"{heldout}-{kind}-{language}")]}


def listed(pool: ValuePool) -> dict[str, tuple[str, ...]]:
    """Every listed value of the pool, per kind (jobs per language), its groups put together."""
    return {name: tuple(value for group in pool.listed(kind, language) for value in group)
            for name, kind, language in (("name", "name", "en"), ("city", "city", "en"), ("job en", "job", "en"),
                                         ("job fr", "job", "fr"))}


def folded(values) -> set[str]:
    return {value.casefold() for value in values}


def test_heldout_and_training_pools_share_no_value_in_any_casing(pools):
    training, heldout = listed(pools[False]), listed(pools[True])
    everything_heldout = folded(v for values in heldout.values() for v in values)
    for kind, values in training.items():
        assert folded(values).isdisjoint(folded(heldout[kind])), kind
        assert folded(values).isdisjoint(everything_heldout), kind  # not even under another kind
    assert all(is_heldout(v) for values in heldout.values() for v in values)
    assert not any(is_heldout(v) for values in training.values() for v in values)


def test_about_one_value_in_eight_is_held_out(pools):
    for kind in ("name", "city"):
        train, held = len(listed(pools[False])[kind]), len(listed(pools[True])[kind])
        assert 0.09 < held / (train + held) < 0.16, (kind, train, held)


def test_the_fixed_lists_are_training_values(pools):
    """Training dialogues use model.languages' values as they are (Curriculum.listed_rate): none may be held
    out, or the unseen evaluation would ask for values the model trained on."""
    fixed = folded((*NAMES, *CITIES, *JOBS, *JOBS_FR))
    assert not any(is_heldout(value) for value in fixed)
    assert fixed <= folded(v for values in listed(pools[False]).values() for v in values)
    assert fixed.isdisjoint(folded(v for values in listed(pools[True]).values() for v in values))


def test_pools_are_large(pools):
    for heldout, pool in pools.items():
        names, cities = len(set(listed(pool)["name"])), len(set(listed(pool)["city"]))
        assert names > 1500 and cities > 2000, (heldout, names, cities)
        assert pool.size("name") == len(listed(pool)["name"]) and pool.size("city") == len(listed(pool)["city"])
        for language in LANGUAGES:
            assert len(set(listed(pool)[f"job {language}"])) >= (30 if heldout else 250), (heldout, language)


def test_every_listed_value_fits(pools):
    for pool in pools.values():
        for kind in ("name", "city", "job"):
            for language in LANGUAGES:
                assert all(group and len(set(group)) == len(group) for group in pool.listed(kind, language))
        for values in listed(pool).values():
            for value in values:
                assert fits(value) and 1 <= len(value.encode("utf-8")) <= MAX_VALUE_BYTES, value
                assert value == value.strip() and "\n" not in value, value


def test_fits_takes_what_people_type_and_nothing_else():
    for value in ("zoé", "Jean-Luc", "O'Neil", "St. Louis", "BOB", "x", "é" * 12, "a" * MAX_VALUE_BYTES, "R2"):
        assert fits(value), value
    for value in ("", " bob", "bob ", "two  spaces", "a" * (MAX_VALUE_BYTES + 1), "é" * 13, "bob!", "a,b",
                  "line\nbreak", "tab\tbed", "{v}"):
        assert not fits(value), value


def test_draws_never_cross_the_split(pools, drawn):
    """Whatever casing or compound a draw makes, a training draw is never a held-out value and vice versa."""
    other_side = {heldout: folded(v for values in listed(pools[not heldout]).values() for v in values)
                  for heldout in pools}
    for (heldout, kind, language), values in drawn.items():
        assert all(fits(v) for v in values), (heldout, kind, language)
        assert all(is_heldout(v) == heldout for v in values), (heldout, kind, language)
        assert folded(values).isdisjoint(other_side[heldout]), (heldout, kind, language)
        assert len(set(values)) > 100  # varied, not a handful repeated


def test_is_heldout_ignores_casing(drawn):
    checked = 0
    for values in drawn.values():
        for value in values[:200]:
            if value.upper().casefold() != value.casefold():
                continue  # Turkish dotless i: "açıkel".upper() is "AÇIKEL", which casefolds to another word
            checked += 1
            assert is_heldout(value) == is_heldout(value.upper()) == is_heldout(value.lower()), value
    assert checked > 0.95 * 200 * len(drawn)


def test_draws_come_in_the_casings_people_type(drawn):
    for heldout in (False, True):
        for kind in KINDS:
            values = [v for language in LANGUAGES for v in drawn[heldout, kind, language]]
            lower = sum(v == v.lower() for v in values)
            upper = sum(v == v.upper() and v != v.lower() for v in values)
            capitalised = sum(v[0].isupper() and v != v.upper() for v in values)
            n = len(values)
            assert 0.3 * n < lower < 0.6 * n, (heldout, kind, lower)
            assert 0.3 * n < capitalised < 0.6 * n, (heldout, kind, capitalised)
            assert 0.01 * n < upper < 0.15 * n, (heldout, kind, upper)


def test_names_are_sometimes_compound(drawn):
    for heldout in (False, True):
        names = drawn[heldout, "name", "en"] + drawn[heldout, "name", "fr"]
        hyphen = sum("-" in name for name in names)
        space = sum(" " in name for name in names)
        share = 0.01 if heldout else 0.03  # a held-out compound must be held out as a whole: rarer
        assert hyphen > share * len(names) and space > share * len(names), (heldout, hyphen, space)
        assert any(re.fullmatch(r"[A-Z]\w+ [A-Z]\w+", name) for name in names)  # capitalised word by word


def test_made_up_words_occur_among_the_draws(pools, drawn):
    every_listed = {heldout: folded(v for values in listed(pool).values() for v in values)
                    for heldout, pool in pools.items()}
    for (heldout, kind, language), values in drawn.items():
        made_up = [v for v in values if v.casefold() not in every_listed[heldout]
                   and not any(part.casefold() in every_listed[heldout] for part in re.split("[- ]", v))]
        # GENERATED_SHARE (1/5) in either half: a made-up word on the wrong side is replaced by another made-up word.
        assert 0.14 * DRAWS < len(made_up) < 0.26 * DRAWS, (heldout, kind, language, len(made_up))


def test_pronounceable_words_are_lowercase_syllables():
    rng = random.Random(0)
    words = [pronounceable(rng) for _ in range(500)]
    assert all(re.fullmatch(r"[a-z]{2,}", word) for word in words)
    assert len(set(words)) > 450
    assert min(map(len, words)) <= 3 and max(map(len, words)) >= 10


def test_typed_changes_only_the_casing():
    rng = random.Random(1)
    forms = {typed("jean-luc de la fontaine", rng) for _ in range(300)}
    assert {form.casefold() for form in forms} == {"jean-luc de la fontaine"}
    assert {"jean-luc de la fontaine", "Jean-luc De La Fontaine", "JEAN-LUC DE LA FONTAINE"} <= forms


def test_draws_are_seed_deterministic(pools):
    again = ValuePool.load(heldout=False)
    assert again == pools[False]
    for language in LANGUAGES:
        for kind in KINDS:
            a = [pools[False].draw(kind, language, random.Random(5)) for _ in range(3)]
            b = [again.draw(kind, language, rng) for rng in [random.Random(5)] for _ in range(50)]
            c = [pools[False].draw(kind, language, rng) for rng in [random.Random(5)] for _ in range(50)]
            d = [pools[False].draw(kind, language, rng) for rng in [random.Random(6)] for _ in range(50)]
            assert len(set(a)) == 1 and b == c != d


def test_french_jobs_are_not_the_english_ones(pools):
    for pool in pools.values():
        english, french = set(listed(pool)["job en"]), set(listed(pool)["job fr"])
        assert len(english & french) < 0.05 * len(french)
        assert sum(not job.isascii() for job in french) > 0.2 * len(french)
        assert all(job.isascii() for job in english)
    assert folded(JOBS_FR) <= folded(listed(pools[False])["job fr"])
    assert folded(JOBS) <= folded(listed(pools[False])["job en"])


def test_no_one_list_dominates_the_draws(pools, drawn):
    """Each locale's list (and our own) is drawn with the same chance, however long it is: Italy's thousands of
    towns do not make most cities Italian."""
    for heldout, pool in pools.items():
        for kind in ("name", "city"):
            groups = [folded(group) for group in pool.listed(kind, "en")]
            # Twenty locales, and model.languages' list (which has no held-out value).
            assert len(groups) == (20 if heldout else 21)
            owners = Counter()
            for value in drawn[heldout, kind, "en"] + drawn[heldout, kind, "fr"]:
                holders = [k for k, group in enumerate(groups) if value.casefold() in group]
                if len(holders) == 1:  # values of one list only say which list was drawn
                    owners[holders[0]] += 1
            top = max(owners.values()) / sum(owners.values())
            assert top < 0.2, (heldout, kind, owners.most_common(3))
            if kind == "city":  # the lists do differ in length that much
                sizes = sorted(len(group) for group in groups)
                assert sizes[-1] > 10 * sizes[len(sizes) // 2]
