"""Whether a bot's small-talk reply follows one of the corpus's reply shapes (model/shapes.py)."""

import random

import pytest

from cellstream.model import corpus
from cellstream.model.corpus import FillerGenerator
from cellstream.model.languages import LANGUAGES
from cellstream.model.shapes import follows_a_shape


@pytest.mark.parametrize("language", list(LANGUAGES))
@pytest.mark.parametrize("heldout", [False, True])
def test_every_small_talk_reply_the_corpus_makes_follows_a_shape(language, heldout):
    filler = FillerGenerator(heldout=heldout, language=LANGUAGES[language])
    bots = set()
    for seed in range(5):
        rng = random.Random(seed)
        for _ in range(400):
            user, bot = filler.turn(rng)
            assert follows_a_shape(bot, user, language), (user, bot)
            bots.add(bot)
    assert len(bots) > 150  # many distinct replies (the held-out half has six bot shapes)


@pytest.mark.parametrize("language", list(LANGUAGES))
def test_small_talk_turns_of_whole_dialogues_follow_a_shape(language):
    rng = random.Random(3)
    replies = 0
    for k in range(150):
        dialogue = corpus.make_dialogue(rng, language=language, heldout=k % 2 == 1, update_rate=0.5, quiz_rate=0.5)
        for turn in dialogue.turns:
            if turn.role == "small talk":
                assert follows_a_shape(turn.bot, turn.user, language), (turn.user, turn.bot)
                replies += 1
            elif turn.role in ("fact", "update", "quiz"):
                assert not follows_a_shape(turn.bot, turn.user, language), turn.bot  # not small talk
    assert replies > 300


@pytest.mark.parametrize(
    ("reply", "user", "language"),
    [
        ("i have never bony sunny.", "the weather is rainy today.", "en"),  # the README's small talk
        ("i have never was a guitar.", "i saw a lovely garden near the river.", "en"),
        ("je préfère le chat l'oreiller, c'était comment ?", "hier j'ai lu le livre.", "fr"),
        ("that sounds fun", "my cat is happy.", "en"),  # no full stop: not the shape
        ("That sounds fun.", "my cat is happy.", "en"),  # nor in another case
        ("that sounds fun. that sounds fun.", "my cat is happy.", "en"),  # the whole reply, not a prefix
        ("", "my cat is happy.", "en"),
        ("ça a l'air amusant.", "hier j'ai lu le livre.", "en"),  # a French shape is no English one
        ("that sounds fun.", "hier j'ai lu le livre.", "fr"),
    ],
)
def test_replies_that_read_as_no_language_follow_no_shape(reply, user, language):
    assert not follows_a_shape(reply, user, language)


@pytest.mark.parametrize(
    ("reply", "user", "language"),
    [
        ("that sounds fun.", "my cat is happy.", "en"),
        ("i have never painted a guitar.", "my cat is happy.", "en"),  # {noun}: any noun, said or not
        ("tell me more about the garden.", "do you like holidays?", "en"),
        ("dis-m'en plus sur le jardin.", "tu aimes le chat ?", "fr"),
        ("je n'ai jamais lu l'oreiller.", "hier j'ai lu le livre.", "fr"),
    ],
)
def test_shapes_without_an_echo_take_any_word_of_their_kind(reply, user, language):
    assert follows_a_shape(reply, user, language)


def test_words_of_the_heldout_half_fill_the_training_shapes_too():
    train, heldout = FillerGenerator(heldout=False), FillerGenerator(heldout=True)
    noun, adj = heldout._pool("noun")[0], heldout._pool("adj")[0]
    assert noun not in train._pool("noun") and adj not in train._pool("adj")
    shape = next(s for s in train._shapes(train.language.small_talk.bot_shapes) if s == "i prefer a {adj} {noun}.")
    assert follows_a_shape(shape.format(adj=adj, noun=noun), "hello.", "en")


@pytest.mark.parametrize(
    ("reply", "user", "language"),
    [
        ("a holiday? tell me more.", "do you like holidays?", "en"),  # the stem of the user's plural
        ("oh, the garden!", "i saw a lovely garden near the river.", "en"),
        ("oh, the river!", "i saw a lovely garden near the river.", "en"),
        ("what kind of cake?", "yesterday i baked a cake.", "en"),
        ("oh, le chat !", "tu préfères le chien ou le chat ?", "fr"),
        ("j'adore l'oreiller.", "j'ai oublié l'oreiller chez moi.", "fr"),
        ("et le coucher de soleil, c'était comment ?", "c'était charmant de voir le coucher de soleil.", "fr"),
    ],
)
def test_an_echo_holds_a_noun_of_the_users_line(reply, user, language):
    assert follows_a_shape(reply, user, language)


@pytest.mark.parametrize(
    ("reply", "user", "language"),
    [
        ("a garden? tell me more.", "do you like holidays?", "en"),  # a noun the user did not say
        ("oh, the cake!", "yesterday i baked a pancake.", "en"),  # inside a word is not said
        ("a holidays? tell me more.", "do you like holidays?", "en"),  # not a noun of the pool
        ("a holidey? tell me more.", "do you like holidays?", "en"),  # a near miss
        ("oh, the gardon!", "i saw a lovely garden near the river.", "en"),
        ("oh, le chien !", "tu aimes le chat ?", "fr"),
        ("oh, le chta !", "tu aimes le chat ?", "fr"),
        ("j'adore chat.", "tu aimes le chat ?", "fr"),  # the French noun comes with its article
    ],
)
def test_an_echo_of_anything_else_fails(reply, user, language):
    assert not follows_a_shape(reply, user, language)
