import math
import random
from itertools import islice, pairwise

import pytest
import torch

from model import corpus, tokenizer
from model.batches import (
    curriculum_max_filler,
    dialogue_batches,
    dialogue_weights,
    encode_dialogue,
    pad_batch,
    text_batches,
)
from model.network import CHRONO_MAX_STEPS
from model.parity import TOLERANCE, scaled_max_diff
from model.train import run_batch, weighted_loss


def test_dialogue_weights_single_out_the_answers():
    qa = corpus.QuestionAnswer("name", "what is my name?", "your name is léa.")
    dialogue = corpus.Dialogue("user: my name is léa.\nbot: hé\n", (qa,), {"name": "léa"})
    weights = dialogue_weights(dialogue, 3.0)
    assert len(weights) == len(dialogue.text.encode("utf-8"))
    plain = len(dialogue.context.encode()) + len(b"user: what is my name?\n")
    assert weights == [1.0] * plain + [3.0] * len("bot: your name is léa.\n".encode())


def test_pad_batch_shifts_targets_and_masks_padding():
    rows = [([1, 2, 3, 4], [1.0, 1.0, 2.0, 3.0]), ([5, 6], [1.0, 4.0])]
    batch = pad_batch(rows)
    pad = tokenizer.PAD
    assert batch.inputs.tolist() == [[1, 2, 3], [5, pad, pad]]
    assert batch.targets.tolist() == [[2, 3, 4], [6, pad, pad]]
    assert batch.weights.tolist() == [[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]]
    assert batch.carry_state is False


def test_encode_dialogue_ends_with_eos():
    dialogue = corpus.make_dialogue(random.Random(0))
    ids, weights = encode_dialogue(dialogue, 2.0)
    assert ids[-1] == tokenizer.EOS and tokenizer.decode(ids) == dialogue.text
    assert len(ids) == len(weights)
    assert set(weights) == {1.0, 2.0}


def test_dialogue_batches_are_seed_deterministic():
    a = list(islice(dialogue_batches(3, 4, 2.0), 5))
    b = list(islice(dialogue_batches(3, 4, 2.0), 5))
    c = list(islice(dialogue_batches(4, 4, 2.0), 5))
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
    rows = [encode_dialogue(corpus.make_dialogue(random.Random(k), max_filler=1), 3.0) for k in range(3)]
    batch = pad_batch(rows)
    h0, c0 = model.zero_state(3)
    with torch.no_grad():
        whole, hn, cn = model(batch.inputs, h0, c0)
        windows = list(run_batch(model, batch, (h0, c0), bptt))
    assert len(windows) == -(-batch.inputs.shape[1] // bptt)
    logits = torch.cat([w[0] for w in windows], dim=1)
    assert scaled_max_diff(logits.numpy(), whole.numpy()) <= TOLERANCE
    h_last, c_last = windows[-1][1]
    assert scaled_max_diff(h_last.numpy(), hn.numpy()) <= TOLERANCE
    assert scaled_max_diff(c_last.numpy(), cn.numpy()) <= TOLERANCE
    loss = weighted_loss(whole, batch.targets, batch.weights)
    assert torch.isfinite(loss) and loss.item() > 0


def test_curriculum_grows_filler_from_2_to_8():
    ramp = 300
    values = [curriculum_max_filler(k, ramp) for k in range(0, 400, 5)]
    assert values[0] == 2 and curriculum_max_filler(ramp - 1, ramp) == 7
    assert all(a <= b for a, b in pairwise(values))
    assert curriculum_max_filler(ramp, ramp) == 8 and curriculum_max_filler(10_000, ramp) == 8
    assert {curriculum_max_filler(k, 0) for k in (0, 1, 50)} == {8}


def test_chrono_initialisation_spreads_memory_timescales(make_model):
    model = make_model(0)
    hidden = model.config.hidden_size
    slow = hidden // 2
    for layer in range(model.config.num_layers):
        bias_ih = getattr(model.lstm, f"bias_ih_l{layer}").detach()
        bias_hh = getattr(model.lstm, f"bias_hh_l{layer}").detach()
        input_gate, forget = bias_ih[:hidden], bias_ih[hidden : 2 * hidden]
        long_forget = forget[hidden - slow :]
        assert torch.equal(input_gate[hidden - slow :], -long_forget)
        assert long_forget.min() >= 0 and long_forget.max() <= math.log(CHRONO_MAX_STEPS - 1)
        assert long_forget.std() > 0.3  # a spread of timescales, not one value
        assert torch.equal(forget[: hidden - slow], torch.ones(hidden - slow))
        assert not input_gate[: hidden - slow].any()
        assert not bias_hh.any() and not bias_ih[2 * hidden :].any()
