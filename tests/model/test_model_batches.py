import random
import re
from itertools import islice, pairwise

import pytest
import torch

from cellstream.model import corpus, tokenizer
from cellstream.model.batches import (
    END,
    IGNORE,
    SLOTS,
    SPELLING_CLASSES,
    LossWeights,
    Row,
    dialogue_batches,
    dialogue_weights,
    encode_dialogue,
    pad_batch,
    random_cuts,
    spelling_targets,
    text_batches,
)
from cellstream.model.curriculum import Curriculum
from cellstream.model.languages import KINDS, LANGUAGES
from cellstream.model.network import SLOW_FORGET_BIAS
from cellstream.model.parity import TOLERANCE, scaled_max_diff
from cellstream.model.probe import SpellingProbe
from cellstream.model.train import run_batch, weighted_loss
from cellstream.model.values import MAX_VALUE_BYTES, ValuePool


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


@pytest.fixture(scope="module")
def draw():
    """Training values as users type them (model.values), the source the curriculum draws from."""
    return ValuePool.load(heldout=False).draw


def statement_dialogue(seed: int, language: str, draw) -> corpus.Dialogue:
    """Facts, small talk and one update, with values of every casing and length."""
    return corpus.make_dialogue(random.Random(seed), language=language, update_rate=1.0, quiz_rate=0.5,
                                max_filler=3, values=draw)


def spelt(slots: torch.Tensor) -> str | None:
    """The value a row of spelling targets spells (None when IGNORE throughout); asserts the layout: bytes,
    END, then IGNORE only."""
    targets = slots.tolist()
    if all(t == IGNORE for t in targets):
        return None
    end = targets.index(END)
    assert all(0 <= t < tokenizer.BYTE_VOCAB for t in targets[:end]), targets
    assert all(t == IGNORE for t in targets[end + 1 :]), targets
    return bytes(targets[:end]).decode("utf-8")


def test_spelling_targets_spell_each_kinds_latest_value_once_its_last_byte_is_read():
    statements = (corpus.Statement("name", "Léa", 10), corpus.Statement("city", "Oslo-Nord", 20),
                  corpus.Statement("city", "rome", 30))
    cuts = (9, 10, 19, 20, 29, 30, 40, 41)
    targets = spelling_targets(statements, cuts, length=40)
    assert targets.shape == (len(cuts), len(KINDS), SLOTS) and targets.dtype == torch.long
    name, city, job = (KINDS.index(kind) for kind in ("name", "city", "job"))
    expected = {9: (None, None), 10: ("Léa", None), 19: ("Léa", None), 20: ("Léa", "Oslo-Nord"),
                29: ("Léa", "Oslo-Nord"), 30: ("Léa", "rome"), 40: ("Léa", "rome"), 41: (None, None)}
    for j, cut in enumerate(cuts):
        assert (spelt(targets[j, name]), spelt(targets[j, city])) == expected[cut], cut
        assert spelt(targets[j, job]) is None  # never stated
    # Bytes, not characters: é is two of them, and END follows the last.
    assert targets[1, name, :5].tolist() == [*"Léa".encode(), END]
    # The update replaced the longer old value from its own end on: Oslo-Nord's extra bytes are IGNORE now.
    assert targets[5, city].tolist() == [*b"rome", END] + [IGNORE] * (SLOTS - 5)
    assert targets[4, city, :10].tolist() == [*b"Oslo-Nord", END]


def test_spelling_targets_of_a_value_filling_every_slot_and_of_no_statement():
    value = "x" * MAX_VALUE_BYTES
    targets = spelling_targets((corpus.Statement("job", value, 30),), (29, 30), length=30)
    assert targets[1, KINDS.index("job")].tolist() == [*value.encode(), END]
    assert (targets[0] == IGNORE).all() and (targets[1, : KINDS.index("job")] == IGNORE).all()
    assert (spelling_targets((), (1, 5), length=10) == IGNORE).all()


@pytest.mark.parametrize("language", ["en", "fr"])
def test_spelling_targets_of_a_dialogue_follow_its_text(draw, language):
    for seed in range(5):
        dialogue = statement_dialogue(seed, language, draw)
        row = encode_dialogue(dialogue, LossWeights())
        assert row.statements == dialogue.statements and len(row.statements) == 4
        length = len(row.ids) - 1
        ends = [s.end for s in row.statements]
        cuts = sorted({*ends, *(end - 1 for end in ends), length})
        targets = spelling_targets(row.statements, cuts, length)
        text = tokenizer.decode(row.ids)
        for j, cut in enumerate(cuts):
            latest = {}
            for statement in row.statements:
                if statement.end <= cut:
                    latest[statement.kind] = statement.value
                if statement.end == cut:  # the bytes read so far end with the value just stated
                    assert text.encode()[:cut].endswith(statement.value.encode())
            for column, kind in enumerate(KINDS):
                assert spelt(targets[j, column]) == latest.get(kind), (cut, kind)
        # At the end every kind spells the dialogue's latest value, the update's included.
        assert [spelt(targets[-1, column]) for column in range(len(KINDS))] == [dialogue.facts[k] for k in KINDS]
        (kind, old), = dialogue.previous.items()
        update = row.statements[-1]
        assert update.kind == kind and spelt(targets[cuts.index(update.end - 1), KINDS.index(kind)]) == old


def test_spelling_probe_learns_from_known_bytes_only():
    torch.manual_seed(0)
    probe = SpellingProbe(6)
    states = torch.randn(2, 3, 6, requires_grad=True)
    assert probe(states).shape == (2, 3, len(KINDS), SLOTS, SPELLING_CLASSES)
    targets = torch.full((2, 3, len(KINDS), SLOTS), IGNORE, dtype=torch.long)
    nothing = probe.loss(states, targets)
    assert nothing.item() == 0.0 and probe.accuracy(states, targets) == 0.0
    targets[0, 2, 1, 0] = ord("r")
    targets[1, 0, 2, 4] = END
    logits = probe(states)
    want = torch.nn.functional.cross_entropy(
        torch.stack([logits[0, 2, 1, 0], logits[1, 0, 2, 4]]), torch.tensor([ord("r"), END]))
    loss = probe.loss(states, targets)
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)
    loss.backward()
    # The loss reaches the state it reads (what trains the LSTM), and only the cuts with a known byte.
    assert states.grad[0, 2].abs().sum() > 0 and states.grad[1, 0].abs().sum() > 0
    assert not states.grad[0, :2].any() and not states.grad[1, 1:].any()


def test_spelling_probe_accuracy_counts_known_bytes_only():
    probe = SpellingProbe(4)
    with torch.no_grad():  # a probe that spells "a" in every slot, whatever the state
        probe.spell.weight.zero_()
        probe.spell.bias.zero_()
        probe.spell.bias[ord("a")] = 1.0
    states = torch.randn(1, 2, 4)
    targets = torch.full((1, 2, len(KINDS), SLOTS), IGNORE, dtype=torch.long)
    targets[0, 0, 0, :3] = torch.tensor([ord("a"), ord("a"), ord("a")])
    assert probe.accuracy(states, targets) == 1.0
    targets[0, 1, 2, 0] = END  # a known end it misses
    assert probe.accuracy(states, targets) == 0.75


def test_random_cuts_are_distinct_sorted_and_within_the_width():
    rng = random.Random(0)
    for width, count in ((100, 12), (13, 12), (12, 12), (5, 12), (1, 3)):
        cuts = random_cuts(rng, width, count)
        assert len(cuts) == min(width, count) and cuts == sorted(set(cuts))
        assert cuts[0] >= 1 and cuts[-1] <= width
    assert random_cuts(random.Random(4), 500, 12) == random_cuts(random.Random(4), 500, 12)
    seen = {cut for _ in range(200) for cut in random_cuts(rng, 30, 2)}
    assert seen == set(range(1, 31))  # every point of the row, the last included


def test_pad_batch_shifts_targets_and_masks_padding():
    rows = [Row([1, 2, 3, 4], [1.0, 1.0, 2.0, 3.0]), Row([5, 6], [1.0, 4.0])]
    batch = pad_batch(rows)
    pad = tokenizer.PAD
    assert batch.inputs.tolist() == [[1, 2, 3], [5, pad, pad]]
    assert batch.targets.tolist() == [[2, 3, 4], [6, pad, pad]]
    assert batch.weights.tolist() == [[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]]
    assert batch.carry_state is False and batch.spelling is None and batch.cuts == ()


def test_pad_batch_spells_each_rows_facts_at_the_cuts(draw):
    dialogues = [statement_dialogue(seed, "en", draw) for seed in (1, 2, 3)]
    rows = [encode_dialogue(d, LossWeights()) for d in dialogues]
    lengths = [len(row.ids) - 1 for row in rows]
    width = max(lengths)
    short = min(range(3), key=lengths.__getitem__)
    cuts = [rows[0].statements[0].end, rows[1].statements[-1].end, lengths[short], lengths[short] + 1, width]
    cuts = sorted(set(cuts))
    batch = pad_batch(rows, cuts)
    assert batch.cuts == tuple(cuts) and batch.inputs.shape == (3, width)
    assert batch.spelling.shape == (3, len(cuts), len(KINDS), SLOTS)
    for r, row in enumerate(rows):
        assert torch.equal(batch.spelling[r], spelling_targets(row.statements, cuts, lengths[r]))
        for j, cut in enumerate(cuts):
            if cut > lengths[r]:  # the state there has read padding: nothing to spell
                assert (batch.spelling[r, j] == IGNORE).all()
    # A cut is an input length: at a statement's end the inputs read so far end with its value.
    first = rows[0].statements[0]
    j = cuts.index(first.end)
    assert tokenizer.decode(batch.inputs[0, : first.end].tolist()).endswith(first.value)
    assert spelt(batch.spelling[0, j, KINDS.index(first.kind)]) == first.value


def test_encode_dialogue_ends_with_eos():
    dialogue = corpus.make_dialogue(random.Random(0))
    row = encode_dialogue(dialogue, LossWeights(value=2.0, user=0.5))
    assert row.ids[-1] == tokenizer.EOS and tokenizer.decode(row.ids) == dialogue.text
    assert len(row.ids) == len(row.weights) and row.statements == dialogue.statements
    assert set(row.weights) == {0.5, 1.0, 2.0}


def row_texts(batch) -> list[str]:
    return [tokenizer.decode(row.tolist()) for row in batch.inputs]


def phrasing_lines(table: str, *languages: str) -> re.Pattern:
    """A user line in any of `languages`' phrasings of `table` ("facts" or "updates"), issue 14's or the
    variants the curriculum adds, any value."""
    variants = {"facts": "fact_variants", "updates": "update_variants"}[table]
    return re.compile("|".join(
        "user: " + re.escape(phrase).replace(re.escape("{v}"), "[^\n]+") + "\n"
        for language in languages for name in (table, variants)
        for phrases in getattr(LANGUAGES[language], name).values() for phrase in phrases))


def test_dialogue_batches_hold_the_curriculums_dialogues(draw):
    """The first bucket of batches holds exactly the first dialogues the curriculum draws from the seed."""
    batch_size, bucket = 4, 3
    curriculum = Curriculum(draw, stage=5)
    batches = list(islice(dialogue_batches(7, batch_size, LossWeights(), curriculum, bucket=bucket), bucket))
    rng = random.Random(7)
    expected = sorted(curriculum.dialogue(rng).text for _ in range(batch_size * bucket))
    assert sorted(text for batch in batches for text in row_texts(batch)) == expected
    # Bucketed by length: each batch holds neighbours in the sorted order, padded to its longest row.
    spans = sorted((min(lengths), max(lengths)) for batch in batches
                   for lengths in [[len(text.encode()) for text in row_texts(batch)]])
    assert all(a[1] <= b[0] for a, b in pairwise(spans))
    assert sorted(batch.inputs.shape[1] for batch in batches) == [high for _, high in spans]


def test_dialogue_batches_at_stage_0_are_one_fact_and_its_acknowledgement(draw):
    curriculum = Curriculum(draw, french_rate=0.5, stage=0)
    facts = phrasing_lines("facts", "en", "fr")
    spelt_somewhere = 0
    for batch in islice(dialogue_batches(2, 8, LossWeights(), curriculum, cuts=4, bucket=2), 4):
        assert len(batch.cuts) == 4
        for r, text in enumerate(row_texts(batch)):
            user, bot = text.splitlines(keepends=True)
            assert facts.fullmatch(user) and bot.startswith("bot: "), text
            for j in range(len(batch.cuts)):  # one fact to spell at most, which both lines say
                known = [value for k in range(len(KINDS)) if (value := spelt(batch.spelling[r, j, k])) is not None]
                assert len(known) <= 1
                assert all(value in user and value in bot for value in known), (known, text)
                spelt_somewhere += len(known)
    assert spelt_somewhere > 10


def test_dialogue_batches_follow_the_curriculum_as_it_advances(draw):
    curriculum = Curriculum(draw, stage=0)
    stream = dialogue_batches(3, 8, LossWeights(), curriculum, bucket=2)
    first = [text for batch in islice(stream, 2) for text in row_texts(batch)]
    assert {text.count("\n") for text in first} == {2}
    for _ in range(4):
        assert curriculum.advance()
    later = [text for batch in islice(stream, 2) for text in row_texts(batch)]  # the next bucket, at stage 4
    assert max(text.count("\n") for text in later) > 12  # small talk now: more than 3 facts and 3 questions


def test_dialogue_batches_respect_the_french_and_update_rates(draw):
    def texts(**rates):
        curriculum = Curriculum(draw, stage=9, **rates)
        return [text for batch in islice(dialogue_batches(5, 8, LossWeights(), curriculum, bucket=2), 8)
                for text in row_texts(batch)]

    english, french = phrasing_lines("facts", "en"), phrasing_lines("facts", "fr")
    updates = phrasing_lines("updates", "en", "fr")
    for text in texts(french_rate=0.0, update_rate=0.0):
        assert english.search(text) and not french.search(text) and not updates.search(text), text
    for text in texts(french_rate=1.0, update_rate=0.0):
        assert french.search(text) and not english.search(text) and not updates.search(text), text
    mixed = texts(french_rate=0.5, update_rate=1.0)
    assert 0.3 < sum(bool(french.search(text)) for text in mixed) / len(mixed) < 0.7
    # Every dialogue of stage 2 or more changes a fact: 1/2 at the current stage + 1/2 x 8/10 below it.
    assert 0.75 < sum(bool(updates.search(text)) for text in mixed) / len(mixed) <= 1.0


def test_dialogue_batches_are_seed_deterministic(draw):
    def stream(seed, rng=None):
        curriculum = Curriculum(draw, stage=4)
        return list(islice(dialogue_batches(seed, 4, LossWeights(2.0), curriculum, cuts=6, rng=rng), 5))

    a, b, c = stream(3), stream(3), stream(4)
    given_rng = stream(0, rng=random.Random(3))  # a saved stream continues from its rng, whatever the seed
    for x, y, z in zip(a, b, given_rng, strict=True):
        assert torch.equal(x.inputs, y.inputs) and x.cuts == y.cuts and torch.equal(x.spelling, y.spelling)
        assert torch.equal(x.inputs, z.inputs) and x.cuts == z.cuts and torch.equal(x.spelling, z.spelling)
    assert any(
        x.inputs.shape != y.inputs.shape or not torch.equal(x.inputs, y.inputs) for x, y in zip(a, c, strict=True)
    )
    for batch in a:
        assert batch.inputs.shape[0] == 4 and not batch.carry_state
        assert len(batch.cuts) == 6 and list(batch.cuts) == sorted(set(batch.cuts))
        assert batch.cuts[0] >= 1 and batch.cuts[-1] <= batch.inputs.shape[1]
        # Every row's real targets are the next input: padding only at the end.
        real = batch.weights > 0
        assert torch.equal(
            batch.inputs[:, 1:][real[:, :-1] & real[:, 1:]], batch.targets[:, :-1][real[:, :-1] & real[:, 1:]]
        )
    assert all(batch.spelling is None and batch.cuts == ()
               for batch in islice(dialogue_batches(3, 4, LossWeights(), Curriculum(draw)), 3))


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
