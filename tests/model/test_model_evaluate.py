import json
import random

import numpy as np
import onnxruntime as ort
import pytest
import torch

from cellstream.model import corpus, tokenizer
from cellstream.model.evaluate import (
    MAX_REPLY_TOKENS,
    NEWLINE,
    GreedyChat,
    Recall,
    Scores,
    converse,
    evaluate,
    evaluate_recall,
    language_report,
    main,
    says,
)
from cellstream.model.languages import CITIES, JOBS, JOBS_FR, KINDS, LANGUAGES, NAMES
from cellstream.model.parity import TOLERANCE, scaled_max_diff
from cellstream.model.values import is_heldout

# Exporting with torch's TorchScript exporter is noisy by design; model/export.py chose it on purpose.
pytestmark = [
    pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning"),
    pytest.mark.filterwarnings("ignore:The feature will be removed:DeprecationWarning"),
]

LAYERS, HIDDEN = 2, 16


def chat_for(path):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return GreedyChat(session, LAYERS, HIDDEN)


def rigged(make_model, token, seed=11):
    """A random LSTM whose head ignores the state and always prefers `token`. Its LSTM is the shared
    `exported` fixture's (seed 11), whose export passes the parity judgement: the honest exports of some
    random models (seed 5's glass box, on the dialogues of model/languages.py) land just over its 1e-5 floor."""
    model = make_model(seed)
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.zero_()
        model.head.bias[token] = 10.0
    return model


def assert_same_state(a, b):
    assert scaled_max_diff(a.h, b.h) <= TOLERANCE
    assert scaled_max_diff(a.c, b.c) <= TOLERANCE
    assert scaled_max_diff(a.last_logits, b.last_logits) <= TOLERANCE


def test_feed_advances_state_and_splits_exactly(exported):
    _, path = exported
    whole, split, once = chat_for(path), chat_for(path), chat_for(path)
    assert whole.last_logits is None and not whole.h.any() and not whole.c.any()
    ids = tokenizer.encode("user: my name is zoe.\n")
    once.feed(ids[:1])
    assert once.h.shape == (LAYERS, 1, HIDDEN) and np.abs(once.h).max() > 1e-3
    assert once.last_logits.shape == (tokenizer.VOCAB_SIZE,)
    whole.feed(ids[:2])
    split.feed(ids[:1])
    split.feed(ids[1:2])
    assert_same_state(whole, split)
    assert scaled_max_diff(whole.h, once.h) > 1e-4  # the second token moved the state further
    whole.feed(ids[2:])
    for token in ids[2:]:
        split.feed([token])
    assert_same_state(whole, split)
    whole.reset()
    assert whole.last_logits is None and not whole.h.any() and not whole.c.any()
    assert whole.reply() == ""


def test_random_model_reply_is_bounded_and_single_line(exported):
    _, path = exported
    chat = chat_for(path)
    for prompt in ("user: what is my name?\nbot: ", "user: hello!\nbot: ", "bot: "):
        chat.reset()
        chat.feed(tokenizer.encode(prompt))
        reply = chat.reply()
        assert "\n" not in reply
        assert len(reply) <= MAX_REPLY_TOKENS


def test_reply_stops_at_newline_and_feeds_it_back(make_model, export_model):
    path = export_model(rigged(make_model, NEWLINE), seed=11, name="newline")
    chat, twin = chat_for(path), chat_for(path)
    prompt = tokenizer.encode("user: hi\nbot: ")
    chat.feed(prompt)
    assert chat.reply() == ""
    twin.feed([*prompt, NEWLINE])
    assert_same_state(chat, twin)  # exactly one token (the newline) was fed back


def test_reply_stops_at_a_special_token(make_model, export_model):
    chat = chat_for(export_model(rigged(make_model, tokenizer.EOS), seed=11, name="eos"))
    chat.feed(tokenizer.encode("bot: "))
    assert chat.reply() == ""


def test_reply_stops_at_max_reply_tokens(make_model, export_model):
    path = export_model(rigged(make_model, ord("a")), seed=11, name="aaa")
    chat, twin = chat_for(path), chat_for(path)
    prompt = tokenizer.encode("bot: ")
    chat.feed(prompt)
    assert chat.reply() == "a" * MAX_REPLY_TOKENS
    twin.feed(prompt + [ord("a")] * MAX_REPLY_TOKENS)
    assert_same_state(chat, twin)


class ScriptedChat:
    """A stand-in for GreedyChat that answers from a script: what `converse` counts can be known."""

    def __init__(self, replies):
        self.replies = list(replies)
        self.fed, self.resets = [], 0

    def reset(self):
        self.resets += 1

    def feed(self, ids):
        self.fed.append(tokenizer.decode(ids))

    def ask(self, user):
        self.fed.append(user)
        return self.replies.pop(0)


def dialogue_with_update(seed=3, language="en"):
    return corpus.make_dialogue(random.Random(seed), language=language, exact_questions=True, update_rate=1.0)


@pytest.mark.parametrize("language", ["en", "fr"])
def test_converse_counts_right_answers_new_values_and_echoed_acknowledgements(language):
    dialogue = dialogue_with_update(language=language)
    assert len(dialogue.previous) == 1
    acks = [turn.bot for turn in dialogue.turns]  # the corpus's own bot lines say every value back
    chat = ScriptedChat([*acks, *(qa.answer for qa in dialogue.questions)])
    scores = Scores()
    converse(chat, dialogue, scores, mode="chat", reset=False)
    assert scores.recall.as_dict() == {"name": 1.0, "city": 1.0, "job": 1.0, "overall": 1.0}
    assert (scores.updated, scores.new_value, scores.old_value) == (1, 1, 0)
    assert (scores.acknowledgements, scores.echoed) == (4, 4)
    assert scores.as_dict()["update"] == {"questions": 1, "new_value": 1.0, "old_value": 0.0}
    assert chat.fed == [turn.user for turn in dialogue.turns] + [qa.question for qa in dialogue.questions]


def test_converse_counts_an_old_value_a_wrong_ack_and_feeds_the_context_when_fed():
    dialogue = dialogue_with_update(seed=4)
    (kind, old), = dialogue.previous.items()
    stale = {qa.kind: qa.answer.replace(dialogue.facts[qa.kind], old) if qa.kind == kind else qa.answer
             for qa in dialogue.questions}
    chat = ScriptedChat(stale[qa.kind] for qa in dialogue.questions)
    scores = Scores()
    converse(chat, dialogue, scores, mode="fed", reset=True)
    assert chat.fed[0] == dialogue.context and chat.resets == 1 + len(dialogue.questions)
    assert scores.recall.correct[kind] == 0 and scores.recall.overall() == pytest.approx(2 / 3)
    assert (scores.updated, scores.new_value, scores.old_value) == (1, 0, 1)
    assert scores.acknowledgements == 0 and "acknowledged" not in scores.as_dict()
    muddled = ScriptedChat(["nice to meet you, hugox.", *["ok."] * 30])
    converse(muddled, dialogue, scores := Scores(), mode="chat", reset=False)
    assert scores.echoed == 0 and scores.acknowledgements == 4


def test_says_matches_whole_words_only():
    assert says("your name is ugo.", "ugo") and says("tu habites à zurich.", "zurich")
    assert not says("your name is hugo.", "ugo") and not says("boulangerie", "boulanger")
    assert says("infirmière, c'est noté.", "infirmière")


@pytest.mark.parametrize("mode", ["fed", "chat"])
def test_evaluate_runs_a_real_model_in_each_language(exported, mode):
    _, path = exported
    for language in ("en", "fr"):
        scores = evaluate(path, 2, language=language, mode=mode, updates=True, seed=7)
        assert scores.recall.dialogues == 2 and scores.updated == 2
        assert scores.acknowledgements == (8 if mode == "chat" else 0)


def test_evaluate_recall_counts_wrong_answers_as_zero(make_model, export_model):
    path = export_model(rigged(make_model, NEWLINE), seed=11, name="mute")
    recall = evaluate_recall(path, 4, reset=False)
    assert recall.dialogues == 4
    assert recall.as_dict() == {"name": 0.0, "city": 0.0, "job": 0.0, "overall": 0.0}


def test_recall_rates():
    recall = Recall(dialogues=4, correct={"name": 4, "city": 2, "job": 0})
    assert recall.rate("name") == 1.0 and recall.rate("city") == 0.5 and recall.rate("job") == 0.0
    assert recall.overall() == 0.5
    assert Recall().overall() == 0.0


def unseen_dialogue(seed=3, language="en", update_rate=0.0, **kwargs):
    """A dialogue whose values are typed as people do (capitals, spaces, hyphens), one fixed value per kind
    and a second one for an update."""
    values = {"name": ["Zoé-Marie", "Jean Luc"], "city": ["New York", "Saint-Étienne"],
              "job": ["Sound Engineer", "Vétérinaire"]}
    drawn = dict.fromkeys(KINDS, 0)

    def draw(kind, language, rng):
        drawn[kind] += 1
        return values[kind][min(drawn[kind], 2) - 1]

    return corpus.make_dialogue(random.Random(seed), language=language, exact_questions=True,
                                update_rate=update_rate, values=draw, **kwargs)


def test_copy_scoring_counts_values_copied_exactly_and_in_any_case():
    dialogue = unseen_dialogue()
    replies = {"name": None, "city": "you live in new york.", "job": "i think you are a Sound Engineer!"}
    answers = {qa.kind: replies[qa.kind] or qa.answer for qa in dialogue.questions}
    for copy in (False, True):
        scores = Scores(copy=copy)
        converse(ScriptedChat(answers[qa.kind] for qa in dialogue.questions), dialogue, scores, mode="fed",
                 reset=False)
        recall = scores.recall
        assert recall.correct == {"name": 1, "city": 0, "job": 0}  # the expected line, exactly
        assert recall.copied == {"name": 1, "city": 0, "job": 1}  # the value as typed, anywhere in the reply
        assert recall.casefolded == {"name": 1, "city": 1, "job": 1}
        report = scores.as_dict()
        if copy:
            assert report["recall"] == {"name": 1.0, "city": 0.0, "job": 1.0, "overall": 0.6667}
            assert report["recall_casefolded"] == {"name": 1.0, "city": 1.0, "job": 1.0, "overall": 1.0}
        else:  # the listed values' figures: the expected line, and nothing casefolded
            assert report["recall"] == {"name": 1.0, "city": 0.0, "job": 0.0, "overall": 0.3333}
            assert "recall_casefolded" not in report


def test_copy_scoring_of_an_update_counts_the_new_value_as_typed_and_the_old_one_in_any_case():
    dialogue = unseen_dialogue(seed=5, update_rate=1.0)
    (kind, old), = dialogue.previous.items()
    new = dialogue.facts[kind]
    assert (old, new) == {"name": ("Zoé-Marie", "Jean Luc"), "city": ("New York", "Saint-Étienne"),
                          "job": ("Sound Engineer", "Vétérinaire")}[kind]

    def run(reply, copy=True):
        scores = Scores(copy=copy)
        chat = ScriptedChat(reply if qa.kind == kind else qa.answer for qa in dialogue.questions)
        converse(chat, dialogue, scores, mode="fed", reset=False)
        return scores.updated, scores.new_value, scores.old_value

    assert run(f"that is {new}, now.") == (1, 1, 0)  # not the expected line, but the value as typed
    assert run(f"that is {new}, now.", copy=False) == (1, 0, 0)
    assert run(f"that is {new.lower()}.") == (1, 0, 0)  # copied in another case: not the value
    assert run(f"it was {old.upper()}.") == (1, 0, 1)  # the old value, in any case
    assert run(f"{new} (not {old})") == (1, 1, 1)


def test_chat_counts_small_talk_replies_that_follow_a_shape():
    dialogue = unseen_dialogue(seed=7, language="fr", min_filler=4, max_filler=4, heldout=True)
    small_talk = [turn for turn in dialogue.turns if turn.role == "small talk"]
    assert len(small_talk) == 4
    nonsense = iter(["je préfère le chat l'oreiller, c'était comment ?", "i have never bony sunny."])
    replies = [next(nonsense) if turn.role == "small talk" and k % 2 else turn.bot
               for k, turn in enumerate(dialogue.turns)]
    bad = sum(turn.role == "small talk" and k % 2 for k, turn in enumerate(dialogue.turns))
    assert 0 < bad <= 2
    chat = ScriptedChat([*replies, *(qa.answer for qa in dialogue.questions)])
    scores = Scores(copy=True)
    converse(chat, dialogue, scores, mode="chat", reset=False)
    assert (scores.small_talk, scores.shaped) == (4, 4 - bad)
    assert scores.as_dict()["small_talk"] == {"replies": 4, "shaped": round((4 - bad) / 4, 4)}
    assert (scores.acknowledgements, scores.echoed) == (3, 3)  # acknowledgements say the values as typed
    assert scores.as_dict()["recall"]["overall"] == 1.0
    fed = Scores()
    converse(ScriptedChat(qa.answer for qa in dialogue.questions), dialogue, fed, mode="fed", reset=False)
    assert fed.small_talk == 0 and "small_talk" not in fed.as_dict()


def test_evaluate_unseen_values_on_a_real_model(exported, monkeypatch):
    _, path = exported
    made = []
    make_dialogue = corpus.make_dialogue

    def recording(*args, **kwargs):
        made.append(make_dialogue(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(corpus, "make_dialogue", recording)
    fixed = {value.casefold() for value in (*NAMES, *CITIES, *JOBS, *JOBS_FR)}
    for language in LANGUAGES:
        made.clear()
        scores = evaluate(path, 2, language=language, mode="chat", updates=True, seed=7, values="unseen")
        assert scores.copy and scores.recall.dialogues == 2 and scores.updated == 2
        assert scores.acknowledgements == 8 and scores.small_talk >= 2
        assert set(scores.as_dict()) == {"recall", "recall_casefolded", "update", "acknowledged", "small_talk"}
        assert len(made) == 2
        for dialogue in made:  # values held out of training, none of the fixed lists
            values = [*dialogue.facts.values(), *dialogue.previous.values()]
            assert all(is_heldout(value) and value.casefold() not in fixed for value in values), values
    listed = evaluate(path, 2, language="en", mode="chat", seed=7)
    assert not listed.copy and "recall_casefolded" not in listed.as_dict()
    assert all(value in NAMES + CITIES + JOBS for value in made[-1].facts.values())


def test_the_report_has_an_unseen_block(exported, tmp_path, capsys):
    _, path = exported
    out = tmp_path / "report.json"
    assert main([str(path), "--dialogues", "1", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert json.loads(capsys.readouterr().out) == report
    assert set(report["unseen"]["languages"]) == set(report["languages"]) == set(LANGUAGES)
    for language in LANGUAGES:
        unseen, listed = report["unseen"]["languages"][language], report["languages"][language]
        assert set(unseen) == set(listed) == {"fed", "chat"}
        assert set(unseen["fed"]) == {"facts", "updates", "facts_state_reset"}
        assert "recall_casefolded" in unseen["chat"]["facts"] and "recall_casefolded" not in listed["chat"]["facts"]
        assert "small_talk" in unseen["chat"]["facts"] and "small_talk" in listed["chat"]["facts"]
    assert "exactly as typed" in report["unseen"]["scoring"]
    assert language_report(path, 1, "fr", "unseen")["fed"]["facts"].keys() == {"recall", "recall_casefolded"}
