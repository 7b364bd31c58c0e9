import random
import re
from itertools import islice, pairwise

import pytest
import torch

from cellstream.model import corpus, tokenizer
from cellstream.model.batches import (
    FACT_VALUES,
    UNKNOWN,
    LossWeights,
    Row,
    curriculum_max_filler,
    dialogue_batches,
    dialogue_weights,
    encode_dialogue,
    fact_labels,
    pad_batch,
    text_batches,
)
from cellstream.model.languages import LANGUAGES
from cellstream.model.network import SLOW_FORGET_BIAS
from cellstream.model.parity import TOLERANCE, scaled_max_diff
from cellstream.model.probe import FactProbe
from cellstream.model.train import run_batch, weighted_loss


def test_dialogue_weights_single_out_values_the_bot_says_back():
    qa = corpus.QuestionAnswer("name", "what is my name?", "your name is léa.")
    fact = corpus.Turn("fact", "my name is léa.", "hé", "name", "léa")
    dialogue = corpus.Dialogue((fact,), (qa,), {"name": "léa"})
    weights = dialogue_weights(dialogue, LossWeights(value=3.0, user=0.5))
    assert len(weights) == len(dialogue.text.encode("utf-8"))
    user_fact = [0.5] * len("user: my name is léa.\n".encode())
    ack = [1.0] * len("bot: hé\n".encode())
    question = [0.5] * len(b"user: what is my name?\n")
    answer = [1.0] * len(b"bot: your name is ") + [3.0] * len("léa".encode()) + [1.0, 1.0]
    assert weights == user_fact + ack + question + answer


def test_dialogue_weights_single_out_old_and_new_values_of_an_update():
    turns = (corpus.Turn("fact", "i live in rome.", "noted, rome.", "city", "rome"),
             corpus.Turn("update", "i moved to oslo.", "noted, oslo now.", "city", "oslo"))
    dialogue = corpus.Dialogue(turns, (), {"city": "oslo"}, previous={"city": "rome"})
    weights = dialogue_weights(dialogue, LossWeights(value=3.0, user=0.5))
    text = dialogue.text.encode()
    heavy = [k for k, w in enumerate(weights) if w == 3.0]
    assert bytes(text[k] for k in heavy) == b"romeoslo"


@pytest.mark.parametrize("language", ["en", "fr"])
def test_fact_labels_start_at_the_last_byte_of_each_stated_value(language):
    dialogue = corpus.make_dialogue(random.Random(11), min_filler=0, max_filler=0, language=language)
    text = dialogue.text.encode()
    labels = fact_labels(dialogue, len(text) + 1)
    ends = {s.kind: s.end for s in dialogue.statements}
    for column, (kind, values) in enumerate(FACT_VALUES.items()):
        value = dialogue.facts[kind].encode()
        end = ends[kind]
        assert text[end - len(value) : end] == value
        assert text[:end - len(value)].count(b"\n") % 2 == 0  # stated in a user line, not echoed by the bot
        assert (labels[: end - 1, column] == UNKNOWN).all()
        assert (labels[end - 1 :, column] == values.index(dialogue.facts[kind])).all()


@pytest.mark.parametrize("language", ["en", "fr"])
def test_fact_labels_follow_an_update_from_its_last_byte_on(language):
    rng = random.Random(12)
    dialogue = corpus.make_dialogue(rng, language=language, update_rate=1.0)
    (kind, old), = dialogue.previous.items()
    column = list(FACT_VALUES).index(kind)
    first, update = [s for s in dialogue.statements if s.kind == kind]
    labels = fact_labels(dialogue, len(dialogue.text.encode()) + 1)
    assert (labels[: first.end - 1, column] == UNKNOWN).all()
    assert (labels[first.end - 1 : update.end - 1, column] == FACT_VALUES[kind].index(old)).all()
    assert (labels[update.end - 1 :, column] == FACT_VALUES[kind].index(dialogue.facts[kind])).all()
    assert old != dialogue.facts[kind]


def test_fact_probe_learns_only_from_known_facts():
    probe = FactProbe(4)
    hidden = torch.randn(2, 3, 4)
    facts = torch.full((2, 3, len(FACT_VALUES)), UNKNOWN, dtype=torch.long)
    assert probe.loss(hidden, facts).item() == 0.0
    facts[0, 2, 0] = 7
    loss = probe.loss(hidden, facts)
    names = probe.linear(hidden[0, 2])[: len(FACT_VALUES["name"])]
    assert loss.item() == pytest.approx(torch.nn.functional.cross_entropy(names[None], torch.tensor([7])).item(),
                                        rel=1e-5)
    # accuracy counts the known labels only: a probe that names index 7 from anything is right on all.
    with torch.no_grad():
        probe.linear.weight.zero_()
        probe.linear.bias.zero_()
        probe.linear.bias[7] = 1.0
    assert probe.accuracy(hidden, facts) == 1.0
    facts[1, 0, 0] = 3  # one known label it misses
    assert probe.accuracy(hidden, facts) == 0.5


def test_pad_batch_shifts_targets_and_masks_padding():
    rows = [Row([1, 2, 3, 4], [1.0, 1.0, 2.0, 3.0]), Row([5, 6], [1.0, 4.0])]
    batch = pad_batch(rows)
    pad = tokenizer.PAD
    assert batch.inputs.tolist() == [[1, 2, 3], [5, pad, pad]]
    assert batch.targets.tolist() == [[2, 3, 4], [6, pad, pad]]
    assert batch.weights.tolist() == [[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]]
    assert batch.carry_state is False and batch.facts is None


def test_encode_dialogue_ends_with_eos():
    dialogue = corpus.make_dialogue(random.Random(0))
    row = encode_dialogue(dialogue, LossWeights(value=2.0, user=0.5))
    assert row.ids[-1] == tokenizer.EOS and tokenizer.decode(row.ids) == dialogue.text
    assert len(row.ids) == len(row.weights) == len(row.facts)
    assert set(row.weights) == {0.5, 1.0, 2.0}


def test_dialogue_batches_mix_languages_and_updates_by_their_rates():
    def texts(**rates):
        batches = islice(dialogue_batches(5, 8, LossWeights(), bucket=2, **rates), 4)
        return [tokenizer.decode(row.tolist()) for batch in batches for row in batch.inputs]

    assert not any("user: je " in text or "user: j'" in text for text in texts())
    french = texts(french_rate=1.0)
    assert all("user: je " in text or "user: j'" in text for text in french)
    assert not any("user: i " in text or "user: my " in text for text in french)
    update_lines = re.compile("|".join(
        "user: " + re.escape(phrase).replace(re.escape("{v}"), r"\w+") + "\n"
        for language in LANGUAGES.values() for phrases in language.updates.values() for phrase in phrases))
    assert not any(update_lines.search(text) for text in texts(french_rate=0.5))
    moves = texts(update_rate=1.0, french_rate=0.5)
    assert all(update_lines.search(text) for text in moves)


def test_dialogue_batches_are_seed_deterministic():
    a = list(islice(dialogue_batches(3, 4, LossWeights(2.0)), 5))
    b = list(islice(dialogue_batches(3, 4, LossWeights(2.0)), 5))
    c = list(islice(dialogue_batches(4, 4, LossWeights(2.0)), 5))
    assert all(torch.equal(x.inputs, y.inputs) for x, y in zip(a, b, strict=True))
    assert any(
        x.inputs.shape != y.inputs.shape or not torch.equal(x.inputs, y.inputs) for x, y in zip(a, c, strict=True)
    )
    for batch in a:
        assert batch.inputs.shape[0] == 4 and not batch.carry_state
        # Every row's real targets are the next input: padding only at the end.
        real = batch.weights > 0
        assert torch.equal(
            batch.inputs[:, 1:][real[:, :-1] & real[:, 1:]], batch.targets[:, :-1][real[:, :-1] & real[:, 1:]]
        )


def test_text_batches_are_contiguous_streams_with_carry_flag():
    text = "".join(f"{k:03d} Noël à Paris. " for k in range(60))
    ids = tokenizer.encode(text)
    window = 16
    stream = text_batches(text, 3, window)
    first = next(stream)
    rows, length = 3, (len(ids) - 1) // 3
    assert first.inputs.shape == (rows, window) and not first.carry_state
    batches = [first, *islice(stream, length // window + (length % window > 0) - 1)]
    assert all(b.carry_state for b in batches[1:])
    inputs = torch.cat([b.inputs for b in batches], dim=1)
    targets = torch.cat([b.targets for b in batches], dim=1)
    for row in range(rows):
        start = row * length
        assert inputs[row].tolist() == ids[start : start + length]
        assert targets[row].tolist() == ids[start + 1 : start + length + 1]
    again = next(stream)  # the stream wraps around and restarts from zero state
    assert torch.equal(again.inputs, first.inputs) and not again.carry_state


def test_text_batches_refuse_too_short_text():
    with pytest.raises(corpus.CorpusError, match="too short"):
        next(text_batches("a", 4, 8))


@pytest.mark.parametrize("bptt", [1, 7, 64])
def test_truncated_bptt_windows_equal_one_forward(make_model, bptt):
    model = make_model(6)
    rows = [encode_dialogue(corpus.make_dialogue(random.Random(k), max_filler=1), LossWeights(3.0)) for k in range(3)]
    batch = pad_batch(rows)
    h0, c0 = model.zero_state(3)
    with torch.no_grad():
        whole, hn, cn = model(batch.inputs, h0, c0)
        windows = list(run_batch(model, batch, (h0, c0), bptt))
        logits = model.head(torch.cat([w[0] for w in windows], dim=1))
    assert len(windows) == -(-batch.inputs.shape[1] // bptt)
    assert scaled_max_diff(logits.numpy(), whole.numpy()) <= TOLERANCE
    h_last, c_last = windows[-1][1]
    assert scaled_max_diff(h_last.numpy(), hn.numpy()) <= TOLERANCE
    assert scaled_max_diff(c_last.numpy(), cn.numpy()) <= TOLERANCE
    loss = weighted_loss(whole, batch.targets, batch.weights)
    assert torch.isfinite(loss) and loss.item() > 0


def test_curriculum_grows_filler_from_0_to_8():
    ramp = 300
    values = [curriculum_max_filler(k, ramp) for k in range(0, 400, 5)]
    assert values[0] == 0 and curriculum_max_filler(ramp - 1, ramp) == 7
    assert all(a <= b for a, b in pairwise(values))
    assert curriculum_max_filler(ramp, ramp) == 8 and curriculum_max_filler(10_000, ramp) == 8
    assert {curriculum_max_filler(k, 0) for k in (0, 1, 50)} == {8}


def test_leaky_initialisation_spreads_memory_timescales(make_model):
    model = make_model(0)
    hidden = model.config.hidden_size
    slow = hidden // 2
    low, high = SLOW_FORGET_BIAS
    for layer in range(model.config.num_layers):
        bias_ih = getattr(model.lstm, f"bias_ih_l{layer}").detach()
        bias_hh = getattr(model.lstm, f"bias_hh_l{layer}").detach()
        forget = bias_ih[hidden : 2 * hidden]
        long_forget = forget[hidden - slow :]
        assert long_forget.min() >= low and long_forget.max() <= high
        assert long_forget.std() > 0.3  # a spread of timescales, not one value
        assert torch.equal(forget[: hidden - slow], torch.ones(hidden - slow))
        assert not bias_ih[:hidden].any()  # input gates half open on every unit
        assert not bias_hh.any() and not bias_ih[2 * hidden :].any()
