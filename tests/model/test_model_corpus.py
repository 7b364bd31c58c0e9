import random
import re
from itertools import islice

import pytest

from cellstream.model import corpus
from cellstream.model.corpus import CorpusError, FillerGenerator, make_dialogue, read_text_corpus
from cellstream.model.languages import CITIES, ENGLISH, FRENCH, JOBS, JOBS_FR, KINDS, LANGUAGES, NAMES

WORD_KINDS = ("noun", "adj", "verb", "feeling", "time")
SHAPES = ENGLISH.small_talk.user_shapes + ENGLISH.small_talk.bot_shapes
FACT_WORDS = set(NAMES) | set(CITIES) | set(JOBS) | set(JOBS_FR)
WORD = r"[a-zà-ÿœ'-]+"


def texts(seed, count=40, **kwargs):
    return [d.text for d in islice(corpus.dialogues(seed, **kwargs), count)]


def filler_turns(dialogue):
    """Small-talk turns of a dialogue: context lines minus the fact pairs and the optional greeting."""
    lines = dialogue.context.splitlines()
    greeting = 2 if lines[0] == "user: hello!" else 0
    filler_lines = len(lines) - greeting - 2 * len(dialogue.facts)
    assert filler_lines % 2 == 0
    assert filler_lines // 2 == sum(turn.role == "small talk" for turn in dialogue.turns)
    return filler_lines // 2


def test_dialogues_are_deterministic_per_seed():
    assert texts(7) == texts(7)
    assert texts(7) != texts(8)
    assert texts(7, heldout=True) == texts(7, heldout=True)
    assert texts(7, heldout=True) != texts(7)
    a, b = random.Random(3), random.Random(3)
    assert make_dialogue(a, exact_questions=True) == make_dialogue(b, exact_questions=True)


@pytest.mark.parametrize("heldout", [False, True])
def test_every_line_has_a_speaker_and_ends_with_newline(heldout):
    for text in texts(1, count=200, heldout=heldout):
        assert text.endswith("\n")
        for line in text.splitlines(keepends=True):
            assert line.startswith(("user: ", "bot: ")), line
            assert line.endswith("\n") and line.count("\n") == 1, line


def test_canonical_fact_phrasings_occur():
    dialogues = list(islice(corpus.dialogues(5), 300))
    seen = {"name": 0, "city": 0, "job": 0}
    for d in dialogues:
        seen["name"] += f"user: my name is {d.facts['name']}.\n" in d.context
        seen["city"] += f"user: i live in {d.facts['city']}.\n" in d.context
        seen["job"] += f"user: i work as a {d.facts['job']}.\n" in d.context
    # Each canonical phrasing is drawn with probability 2/8 (name), 2/7 (city, job).
    assert seen["name"] > 60 and seen["city"] > 60 and seen["job"] > 60, seen
    for d in dialogues:
        for kind, value in d.facts.items():
            stated = [p.format(v=value) for p in ENGLISH.facts[kind]]
            assert any(f"user: {s}\n" in d.context for s in stated), (kind, d.context)


def test_exact_questions_and_answers():
    rng = random.Random(9)
    for _ in range(100):
        d = make_dialogue(rng, exact_questions=True, heldout=True)
        name, city, job = d.facts["name"], d.facts["city"], d.facts["job"]
        assert sorted(qa.kind for qa in d.questions) == ["city", "job", "name"]
        expected = {
            "name": ("what is my name?", f"your name is {name}."),
            "city": ("where do i live?", f"you live in {city}."),
            "job": ("what is my job?", f"you work as a {job}."),
        }
        for qa in d.questions:
            assert (qa.question, qa.answer) == expected[qa.kind]
        tail = d.text[len(d.context) :]
        assert tail == "".join(f"user: {qa.question}\nbot: {qa.answer}\n" for qa in d.questions)
        assert "user: what is my name?\nbot: your name is " + name + ".\n" in d.text
        assert "user: where do i live?\nbot: you live in " + city + ".\n" in d.text
        assert "user: what is my job?\nbot: you work as a " + job + ".\n" in d.text


def test_question_variants_without_exact_questions():
    rng = random.Random(4)
    questions = {qa.question for _ in range(300) for qa in make_dialogue(rng).questions}
    assert questions == {q for variants in ENGLISH.question_variants.values() for q in variants}


def test_fact_lists():
    for values, minimum in ((NAMES, 50), (CITIES, 30), (JOBS, 20), (JOBS_FR, 20)):
        assert len(values) >= minimum
        assert len(set(values)) == len(values)
        for value in values:
            assert re.fullmatch(r"[a-zàâçéèêëîïôûùüÿœ]+", value), value
    lists = (set(NAMES), set(CITIES), set(JOBS), set(JOBS_FR))
    assert sum(map(len, lists)) == len(set().union(*lists)), "a value belongs to two lists"
    assert {"infirmière", "boulanger"} <= set(JOBS_FR)
    assert sum(not value.isascii() for value in JOBS_FR) >= 8


def test_filler_turn_count_between_1_and_8():
    rng = random.Random(2)
    counts = [filler_turns(make_dialogue(rng)) for _ in range(400)]
    assert min(counts) == 1 and max(counts) == 8
    assert set(counts) == set(range(1, 9))
    rng = random.Random(2)
    assert {filler_turns(make_dialogue(rng, min_filler=3, max_filler=3)) for _ in range(20)} == {3}


def test_heldout_filler_shares_no_shape_or_word_with_training():
    train, heldout = FillerGenerator(heldout=False), FillerGenerator(heldout=True)
    assert set(train._shapes(SHAPES)).isdisjoint(heldout._shapes(SHAPES))
    assert set(train._shapes(SHAPES)) | set(heldout._shapes(SHAPES)) == set(SHAPES)
    train_words = {w for kind in WORD_KINDS for w in train._pool(kind)}
    heldout_words = {w for kind in WORD_KINDS for w in heldout._pool(kind)}
    assert train_words.isdisjoint(heldout_words)
    for kind in WORD_KINDS:
        assert heldout._pool(kind) and train._pool(kind)
    # Observable consequence: no held-out sentence is ever produced by the training generator.
    rng = random.Random(0)
    train_lines = {text for _ in range(3000) for text in train.turn(rng)}
    heldout_lines = {text for _ in range(3000) for text in heldout.turn(rng)}
    assert train_lines.isdisjoint(heldout_lines)
    # ...and neither side ever uses a one-word pool entry of the other, not even inside its time phrases.
    single_train = {w for w in train_words if " " not in w}
    single_heldout = {w for w in heldout_words if " " not in w}
    heldout_tokens = {w for line in heldout_lines for w in re.findall(r"[a-z]+", line)}
    train_tokens = {w for line in train_lines for w in re.findall(r"[a-z]+", line)}
    assert len(heldout_tokens & single_heldout) > 20 and len(train_tokens & single_train) > 60
    assert not heldout_tokens & single_train, heldout_tokens & single_train
    assert not train_tokens & single_heldout, train_tokens & single_heldout
    # Every kind of pool, verbs included, is used by the held-out shapes.
    assert any("{verb}" in shape for shape in heldout._shapes(SHAPES))


@pytest.mark.parametrize("language", list(LANGUAGES))
@pytest.mark.parametrize("heldout", [False, True])
def test_filler_never_mentions_a_fact_word(heldout, language):
    filler = FillerGenerator(heldout=heldout, language=LANGUAGES[language])
    rng = random.Random(1)
    words = set()
    for _ in range(3000):
        for line in filler.turn(rng):
            words.update(re.findall(r"\w+", line))
    assert len(words) > 30
    assert not words & FACT_WORDS, words & FACT_WORDS


def test_french_heldout_filler_shares_no_shape_or_entry_with_training():
    train, heldout = FillerGenerator(False, FRENCH), FillerGenerator(True, FRENCH)
    talk = FRENCH.small_talk
    shapes = talk.user_shapes + talk.bot_shapes
    assert set(train._shapes(shapes)).isdisjoint(heldout._shapes(shapes))
    assert any("{verb}" in shape for shape in heldout._shapes(shapes))
    for kind in WORD_KINDS:
        assert heldout._pool(kind) and train._pool(kind)
        assert set(train._pool(kind)).isdisjoint(heldout._pool(kind)), kind
    rng = random.Random(0)
    train_lines = {text for _ in range(3000) for text in train.turn(rng)}
    heldout_lines = {text for _ in range(3000) for text in heldout.turn(rng)}
    assert train_lines.isdisjoint(heldout_lines)
    assert any(not line.isascii() for line in heldout_lines)


def test_read_text_corpus_accepts_utf8(tmp_path):
    path = tmp_path / "fr.txt"
    path.write_text("Élodie a mangé une crème brûlée à Noël.\n", encoding="utf-8")
    assert read_text_corpus(path) == "Élodie a mangé une crème brûlée à Noël.\n"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "not found"),
        ("dir", "not a file"),
        (b"", "empty"),
        (b"  \n\t\n ", "empty"),
        (b"caf\xe9 au lait\n", "not valid UTF-8"),
    ],
)
def test_read_text_corpus_rejects(tmp_path, content, message):
    path = tmp_path / "corpus.txt"
    if content == "dir":
        path.mkdir()
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(CorpusError, match=message):
        read_text_corpus(path)


def test_bot_small_talk_often_picks_up_a_noun_of_the_user():
    filler = FillerGenerator()
    rng = random.Random(4)
    turns = [filler.turn(rng) for _ in range(500)]
    nouns = set(filler._pool("noun"))
    echoed = sum(bool(nouns & set(re.findall(r"[a-z]+", user)) & set(re.findall(r"[a-z]+", bot)))
                 for user, bot in turns)
    assert 0.2 < echoed / len(turns) < 0.9


def test_quiz_questions_ask_stated_facts_during_small_talk():
    rng = random.Random(5)
    dialogue = make_dialogue(rng, min_filler=8, max_filler=8, quiz_rate=1.0)
    lines = dialogue.context.splitlines()
    answers = [text[len("bot: "):] for text in lines if text.startswith("bot: ") and corpus.is_answer(text[5:])]
    assert len(answers) == 8
    assert all(any(value in answer for value in dialogue.facts.values()) for answer in answers)
    assert make_dialogue(random.Random(5), min_filler=8, max_filler=8).context.count("\n") == 6 + 16


def test_french_dialogues_use_the_fixed_phrasings_and_questions():
    rng = random.Random(12)
    dialogues = [make_dialogue(rng, language="fr", exact_questions=True, heldout=True) for _ in range(300)]
    seen = {"name": 0, "city": 0, "job": 0}
    for d in dialogues:
        name, city, job = d.facts["name"], d.facts["city"], d.facts["job"]
        assert d.language == "fr" and job in JOBS_FR
        seen["name"] += f"user: je m'appelle {name}.\n" in d.context
        seen["city"] += f"user: j'habite à {city}.\n" in d.context
        seen["job"] += f"user: je travaille comme {job}.\n" in d.context
        expected = {
            "name": ("comment je m'appelle ?", f"tu t'appelles {name}."),
            "city": ("où est-ce que j'habite ?", f"tu habites à {city}."),
            "job": ("quel est mon métier ?", f"tu travailles comme {job}."),
        }
        assert sorted(qa.kind for qa in d.questions) == ["city", "job", "name"]
        for qa in d.questions:
            assert (qa.question, qa.answer) == expected[qa.kind]
        assert not re.search(r"\b(the|my|you|is)\b", d.text), d.text  # one language per dialogue
    # Each canonical phrasing is drawn with probability 2/7 (name), 2/6 (city, job).
    assert min(seen.values()) > 60, seen
    assert any("infirmière" in d.text or "bibliothécaire" in d.text for d in dialogues)


def test_english_dialogues_stay_english():
    rng = random.Random(13)
    for _ in range(200):
        d = make_dialogue(rng, language="en", quiz_rate=0.5, update_rate=0.5)
        assert d.text.isascii() and d.facts["job"] in JOBS
        assert not re.search(r"\b(je|tu|est|le|la)\b", d.text), d.text


@pytest.mark.parametrize("language", list(LANGUAGES))
def test_an_update_changes_one_fact_after_small_talk_and_questions_expect_the_new_value(language):
    rng = random.Random(21)
    lang = LANGUAGES[language]
    kinds_updated = set()
    for _ in range(200):
        d = make_dialogue(rng, language=language, update_rate=1.0, exact_questions=True)
        assert len(d.previous) == 1
        (kind, old), = d.previous.items()
        kinds_updated.add(kind)
        new = d.facts[kind]
        assert new != old and new in lang.values(kind)
        roles = [turn.role for turn in d.turns]
        update = roles.index("update")
        assert "small talk" in roles[:update], roles  # the move comes after some small talk
        turn = d.turns[update]
        assert (turn.kind, turn.value) == (kind, new)
        assert turn.user in {p.format(v=new) for p in lang.updates[kind]}
        assert re.search(rf"(?<!\w){new}(?!\w)", turn.bot), turn.bot  # the bot acknowledges the new value
        answers = {qa.kind: qa.answer for qa in d.questions}
        assert answers[kind] == lang.questions[kind][1].format(v=new)
        assert old not in answers[kind]
    assert kinds_updated == {"name", "city", "job"}


def test_updates_use_the_required_english_phrasings():
    rng = random.Random(22)
    lines = {turn.user for _ in range(600)
             for turn in make_dialogue(rng, update_rate=1.0).turns if turn.role == "update"}
    for pattern in (r"i moved to [a-z]+\.", r"i work as a [a-z]+ now\.", r"actually, my name is [a-z]+\."):
        assert any(re.fullmatch(pattern, text) for text in lines), pattern
    french = {turn.user for _ in range(600)
              for turn in make_dialogue(rng, language="fr", update_rate=1.0).turns if turn.role == "update"}
    assert any(re.fullmatch(r"j'ai déménagé à [a-z]+\.", text) for text in french)


def test_update_rate_zero_never_updates_and_quizzes_after_an_update_expect_the_new_value():
    rng = random.Random(23)
    assert not any(make_dialogue(rng).previous for _ in range(200))
    checked = 0
    for _ in range(200):
        d = make_dialogue(rng, update_rate=1.0, quiz_rate=1.0, min_filler=4, max_filler=8)
        (kind, old), = d.previous.items()
        update = next(k for k, turn in enumerate(d.turns) if turn.role == "update")
        for k, turn in enumerate(d.turns):
            if turn.role == "quiz" and turn.kind == kind:
                assert turn.value == (old if k < update else d.facts[kind])
                assert turn.value in turn.bot
                checked += 1
    assert checked > 100


@pytest.mark.parametrize("language", list(LANGUAGES))
def test_statements_end_just_past_each_stated_value(language):
    rng = random.Random(24)
    for _ in range(100):
        d = make_dialogue(rng, language=language, update_rate=1.0, quiz_rate=0.5)
        text = d.text.encode("utf-8")
        statements = d.statements
        assert [s.kind for s in statements][:3] == [t.kind for t in d.turns if t.role == "fact"]
        assert len(statements) == 4
        for statement in statements:
            value = statement.value.encode("utf-8")
            assert text[statement.end - len(value) : statement.end] == value
            line_start = text.rindex(b"\n", 0, statement.end) + 1 if b"\n" in text[: statement.end] else 0
            assert text[line_start:].startswith(b"user: ")
        assert statements[-1].value == d.facts[statements[-1].kind]


def typed_values(kind: str, language: str, rng: random.Random) -> str:
    """Values as people type them: capitals, accents, spaces, hyphens, apostrophes."""
    return rng.choice(("Zoé-Marie", "NEW YORK", "Saint-Étienne", "d'Artagnan", "van der Berg", "Ōsaka",
                       f"{kind}{language}{rng.randrange(1000)}"))


def phrasing_of(turn: corpus.Turn, lang) -> str:
    table = lang.facts if turn.role == "fact" else lang.updates
    return next(phrase for phrase in table[turn.kind] if phrase.format(v=turn.value) == turn.user)


@pytest.mark.parametrize("language", list(LANGUAGES))
def test_values_come_from_the_source_and_every_phrasing_is_used(language):
    rng = random.Random(31)
    lang = LANGUAGES[language]
    used = set()
    for _ in range(400):
        d = make_dialogue(rng, language=language, update_rate=1.0, quiz_rate=0.5, exact_questions=True,
                          values=typed_values)
        offset, statements = 0, iter(d.statements)
        for turn in d.turns:
            if turn.role in ("fact", "update"):
                phrase = phrasing_of(turn, lang)
                used.add(phrase)
                # The statement ends where the phrasing's {v} ends, whatever follows it in the line.
                prefix = corpus.line("user", phrase.split("{v}")[0]).rstrip("\n")
                assert next(statements).end == offset + len(prefix.encode()) + len(turn.value.encode())
                assert re.search(rf"(?<!\w){re.escape(turn.value)}(?!\w)", turn.bot), turn.bot  # said back as typed
            offset += len(turn.text.encode())
        for qa in d.questions:
            assert qa.answer == lang.questions[qa.kind][1].format(v=d.facts[qa.kind])
        assert set(d.facts.values()) | set(d.previous.values()) <= {
            turn.value for turn in d.turns if turn.role in ("fact", "update")}
    every = {phrase for table in (lang.facts, lang.updates) for phrases in table.values() for phrase in phrases}
    assert used == every


def test_an_update_draws_again_until_the_value_differs_in_more_than_case():
    def scripted():
        """Zoé for every first draw of a kind, then Zoé in other casings, then Léa."""
        calls = dict.fromkeys(KINDS, 0)

        def draw(kind, language, rng):
            calls[kind] += 1
            return ("Zoé", "ZOÉ", "zoé", "Léa")[min(calls[kind], 4) - 1]

        return draw

    for seed in range(20):
        d = make_dialogue(random.Random(seed), update_rate=1.0, values=scripted())
        (kind, old), = d.previous.items()
        assert (old, d.facts[kind]) == ("Zoé", "Léa")
        assert all(d.facts[other] == "Zoé" for other in d.facts if other != kind)


@pytest.mark.parametrize("language", ["en", "fr"])
def test_variants_add_natural_phrasings_only_where_asked(language):
    lang = LANGUAGES[language]

    def stated(variants):
        rng = random.Random(9)
        lines = set()
        for _ in range(400):
            d = make_dialogue(rng, language=language, update_rate=1.0, variants=variants)
            lines.update(turn.user.replace(turn.value, "{v}") for turn in d.turns if turn.role in ("fact", "update"))
        return lines

    fixed = {p for table in (lang.facts, lang.updates) for phrases in table.values() for p in phrases}
    added = {p for table in (lang.fact_variants, lang.update_variants) for phrases in table.values() for p in phrases}
    assert added and not added & fixed
    assert stated(False) <= fixed  # issue 14's figures are measured on its own phrasings
    assert added <= stated(True) <= fixed | added
