"""The training-time evaluation counts what it claims (a stand-in model that sees the answer scores 1), the
state the probe reads is the state of one forward run, and the learning-rate schedule."""

import argparse
from itertools import pairwise

import pytest
import torch
from torch import nn

from cellstream.model import tokenizer
from cellstream.model.curriculum import LAST_STAGE, Curriculum
from cellstream.model.parity import TOLERANCE, scaled_max_diff
from cellstream.model.probe import SpellingProbe
from cellstream.model.train import (
    Evaluation,
    build_parser,
    describe_corpus,
    evaluate_curriculum,
    evaluate_dialogues,
    learning_rate,
    max_value_bytes,
    pick_device,
    scheduled_stage,
    states_at_cuts,
    train,
)
from cellstream.model.values import MAX_VALUE_BYTES, ValuePool


class Oracle(nn.Module):
    """Predicts each next byte by reading it from the input (not causal): every answer and echo exactly right.
    With `shift`, it predicts the byte after that instead: every one wrong.

    The evaluation runs the inputs in pieces between its cuts and applies the head once at the end, so the
    hidden state holds each step's position, the cell state counts the steps read, and the head looks the
    following byte up in the pieces read."""

    def __init__(self, shift: int = 1) -> None:
        super().__init__()
        self.shift = shift
        self.anchor = nn.Parameter(torch.zeros(()))  # the evaluation finds the device from a parameter
        self.pieces: list[torch.Tensor] = []

    def zero_state(self, batch):
        return torch.zeros(1, batch, 1), torch.zeros(1, batch, 1)

    def hidden_states(self, tokens, h, c):
        if not c.any():
            self.pieces = []
        start, width = int(c[0, 0, 0]), tokens.shape[1]
        self.pieces.append(tokens)
        positions = torch.arange(start, start + width).float().expand(tokens.shape[0], width)
        return positions.unsqueeze(-1), h, c + width

    def head(self, hidden):
        following = torch.roll(torch.cat(self.pieces, 1), -self.shift, dims=1)
        return nn.functional.one_hot(following.gather(1, hidden[..., 0].long()), tokenizer.VOCAB_SIZE).float() * 10


@pytest.fixture(scope="module")
def heldout():
    return ValuePool.load(heldout=True)


def evaluate(model, heldout, stage, probe=None):
    curriculum = Curriculum(ValuePool.load(heldout=False).draw)
    return evaluate_dialogues(model, probe or SpellingProbe(2), seed=1, count=8, curriculum=curriculum, stage=stage,
                              values=heldout.draw)


def test_answer_and_echo_accuracy_count_right_answers(heldout):
    right, wrong = evaluate(Oracle(), heldout, LAST_STAGE), evaluate(Oracle(shift=2), heldout, LAST_STAGE)
    assert right.answer_accuracy == 1.0 and wrong.answer_accuracy == 0.0
    assert right.echo_accuracy == 1.0 and wrong.echo_accuracy == 0.0
    assert right.loss < 0.1 < 5 < wrong.loss
    assert right.stage == wrong.stage == LAST_STAGE
    assert 0.0 <= right.probe_accuracy <= 1.0


def test_echoes_are_also_counted_by_the_value_s_length(heldout):
    right, wrong = evaluate(Oracle(), heldout, LAST_STAGE), evaluate(Oracle(shift=2), heldout, LAST_STAGE)
    buckets = ("1-6", "7-12", "13-18", "19-24")
    assert set(right.echo_by_length) <= set(buckets) and len(right.echo_by_length) >= 3
    assert set(right.echo_by_length.values()) == {1.0} and set(wrong.echo_by_length.values()) == {0.0}
    assert right.echo_by_length.keys() == wrong.echo_by_length.keys()


def test_stage_0_has_echoes_and_no_answers(heldout):
    right, wrong = evaluate(Oracle(), heldout, 0), evaluate(Oracle(shift=2), heldout, 0)
    assert right.answer_accuracy is None and wrong.answer_accuracy is None
    assert right.echo_accuracy == 1.0 and wrong.echo_accuracy == 0.0
    assert right.stage == 0


def test_a_random_probe_spells_almost_nothing(make_model, heldout):
    model = make_model(4)
    curriculum = Curriculum(ValuePool.load(heldout=False).draw)
    torch.manual_seed(0)
    probe = SpellingProbe(2 * model.config.num_layers * model.config.hidden_size)
    result = evaluate_dialogues(model, probe, seed=2, count=4, curriculum=curriculum, stage=3, values=heldout.draw)
    assert result.answer_accuracy == 0.0 and result.probe_accuracy < 0.05 and 4 < result.loss < 7


def test_evaluate_curriculum_measures_the_last_stage_and_the_current_one(monkeypatch, heldout):
    calls = []

    def fake(model, probe, seed, count, curriculum, stage, values):
        calls.append((seed, count, stage, values))
        return Evaluation(loss=float(stage), answer_accuracy=None if stage == 0 else stage / 20,
                          echo_accuracy=stage / 100, probe_accuracy=0.5, stage=stage)

    monkeypatch.setattr("cellstream.model.train.evaluate_dialogues", fake)
    args = argparse.Namespace(seed=5, eval_dialogues=12)
    curriculum = Curriculum(ValuePool.load(heldout=False).draw)

    at_0 = evaluate_curriculum(None, None, args, curriculum, heldout)
    assert [(seed, count, stage) for seed, count, stage, _ in calls] == [(5, 12, LAST_STAGE), (5, 12, 0)]
    assert all(values == heldout.draw for *_, values in calls)  # held-out values, always
    # The curve's figures are the last stage's; stage 0's echoes (what it advances on) replace its echoes.
    assert (at_0.loss, at_0.answer_accuracy, at_0.stage) == (LAST_STAGE, 0.5, 0)
    assert at_0.stage_answer_accuracy is None and at_0.echo_accuracy == 0.0

    calls.clear()
    curriculum.stage = 4
    at_4 = evaluate_curriculum(None, None, args, curriculum, heldout)
    assert [stage for _, _, stage, _ in calls] == [LAST_STAGE, 4]
    assert (at_4.answer_accuracy, at_4.stage_answer_accuracy, at_4.echo_accuracy, at_4.stage) == (0.5, 0.2, 0.1, 4)

    calls.clear()
    curriculum.stage = LAST_STAGE
    last = evaluate_curriculum(None, None, args, curriculum, heldout)
    assert [stage for _, _, stage, _ in calls] == [LAST_STAGE]  # one evaluation when they are the same
    assert last.answer_accuracy == last.stage_answer_accuracy == 0.5 and last.stage == LAST_STAGE


@pytest.mark.parametrize("cuts", [[1, 7, 8, 25, 40], [40], [13], []])
def test_states_at_cuts_equal_one_forward_run(make_model, cuts):
    model = make_model(3)
    layers, size = model.config.num_layers, model.config.hidden_size
    inputs = torch.randint(0, 256, (3, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hidden, states = states_at_cuts(model, inputs, cuts)
        whole, _, _ = model.hidden_states(inputs, *model.zero_state(3))
        assert hidden.shape == whole.shape == (3, 40, size)
        assert scaled_max_diff(hidden.numpy(), whole.numpy()) <= TOLERANCE
        assert states.shape[:2] == (3, len(cuts))
        for j, cut in enumerate(cuts):
            _, h, c = model.hidden_states(inputs[:, :cut], *model.zero_state(3))
            want = torch.cat([*h, *c], dim=-1)  # h of every layer, then C of every layer
            assert states.shape[2] == 2 * layers * size
            assert scaled_max_diff(states[:, j].numpy(), want.numpy()) <= TOLERANCE, cut


def test_states_at_cuts_carry_gradients_to_the_network(make_model):
    model = make_model(3)
    inputs = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(1))
    _, states = states_at_cuts(model, inputs, [5])
    states.sum().backward()
    assert model.embed.weight.grad.abs().sum() > 0


def schedule(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(list(argv))


def test_learning_rate_warms_up_then_follows_a_cosine_to_the_final_ratio():
    args = schedule("--steps", "1000", "--warmup-steps", "100", "--lr", "0.01", "--final-lr-ratio", "0.1")
    rates = [learning_rate(args, step) for step in range(1000)]
    assert rates[:100] == pytest.approx([0.01 * (k + 1) / 100 for k in range(100)])
    assert rates[99] == rates[100] == pytest.approx(0.01)  # the peak, then the cosine from it
    assert all(a >= b for a, b in pairwise(rates[100:]))
    assert learning_rate(args, 100 + 899 / 2) == pytest.approx(0.01 * (0.1 + 0.9 * 0.5))  # half way down
    assert min(rates[100:-1]) > 0.001
    assert rates[-1] == pytest.approx(0.001)  # the last step trains at the final rate


def test_learning_rate_without_warm_up_and_with_warm_up_beyond_the_run():
    args = schedule("--steps", "10", "--warmup-steps", "0", "--lr", "0.002", "--final-lr-ratio", "0.5")
    assert learning_rate(args, 0) == pytest.approx(0.002) and learning_rate(args, 9) == pytest.approx(0.001)
    args = schedule("--steps", "10", "--warmup-steps", "20", "--lr", "0.002")
    assert [learning_rate(args, step) for step in range(10)] == pytest.approx([0.002 * (k + 1) / 20
                                                                                for k in range(10)])


def test_the_curriculum_reaches_stage_s_by_s_tenths_of_its_deadline():
    args = schedule("--steps", "1000", "--last-stage-by", "0.6")  # the last stage by step 600
    stages = [scheduled_stage(args, step) for step in range(1000)]
    assert stages[0] == 0 and all(a <= b for a, b in pairwise(stages))
    for stage in range(1, LAST_STAGE + 1):
        first = stages.index(stage)
        assert first == -(-stage * 600 // LAST_STAGE), stage  # the first step at or past stage / 10 of 600
    assert set(stages[600:]) == {LAST_STAGE}
    assert {scheduled_stage(schedule("--last-stage-by", "0"), step) for step in (0, 1, 4000)} == {LAST_STAGE}
    late = schedule("--steps", "90", "--last-stage-by", "1")
    assert [scheduled_stage(late, step) for step in (0, 8, 9, 89)] == [0, 0, 1, 9] and LAST_STAGE == 10


def test_several_facts_by_gives_the_echo_and_one_fact_stages_their_own_share_of_the_steps():
    args = schedule("--steps", "1000", "--several-facts-by", "0.4", "--last-stage-by", "0.8")
    stages = [scheduled_stage(args, step) for step in range(1000)]
    assert all(a <= b for a, b in pairwise(stages))
    # Stage 1 (one fact) by step 200, stage 2 by 400, then stages 3..10 every 50 steps up to 800.
    assert [stages.index(stage) for stage in range(LAST_STAGE + 1)] == [0, 200, 400, *range(450, 801, 50)]
    assert set(stages[800:]) == {LAST_STAGE}
    assert "stage 2 by 40% of the steps and the last stage by 80%" in describe_corpus(args)
    assert "the last stage by 60% of the steps" in describe_corpus(schedule())
    whole = schedule("--steps", "100", "--several-facts-by", "0.5", "--last-stage-by", "0.5")
    assert [scheduled_stage(whole, step) for step in (0, 24, 25, 49, 50, 99)] == [0, 0, 1, 1, LAST_STAGE, LAST_STAGE]


def test_several_facts_after_the_last_stage_is_refused_before_training(tmp_path):
    args = schedule("--several-facts-by", "0.7", "--last-stage-by", "0.6", "--out", str(tmp_path / "m.pt"))
    with pytest.raises(ValueError, match=r"--several-facts-by 0\.7 comes after --last-stage-by 0\.6"):
        train(args)
    assert not (tmp_path / "m.pt").exists()


def test_defaults_of_the_schedule_and_curriculum():
    args = schedule()
    assert (args.warmup_steps, args.final_lr_ratio, args.first_stage, args.probe_weight) == (300, 0.1, 0, 1.0)
    assert args.last_stage_by == 0.6 and args.several_facts_by is None
    assert (args.echo_facts, args.answer_weight) == (3, 20.0)
    assert not args.fresh and args.resume is None and args.device == "auto"


def test_training_values_start_short_and_grow_a_byte_at_a_time():
    args = schedule("--value-bytes-from", "6", "--value-bytes-every", "300")
    assert [max_value_bytes(args, step) for step in (0, 299, 300, 899, 900, 5399, 5400, 9000)] == \
        [6, 6, 7, 8, 9, 23, 24, 24]
    assert max_value_bytes(schedule("--value-bytes-every", "0"), 0) == MAX_VALUE_BYTES == 24
    for bad in ("3", "25"):
        with pytest.raises(SystemExit):
            schedule("--value-bytes-from", bad)
    assert max_value_bytes(schedule(), 0) == 6  # the default: short first


def test_pick_device():
    assert pick_device("cpu") == torch.device("cpu")
    assert pick_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="--device cuda, but torch sees no CUDA device"):
            pick_device("cuda")


def test_evaluation_rows_are_reproducible(heldout):
    """The same seed, stage and values give the same figures: the curve is comparable from run to run."""
    probe = SpellingProbe(2)
    a, b = evaluate(Oracle(shift=2), heldout, 3, probe), evaluate(Oracle(shift=2), heldout, 3, probe)
    assert a == b
    c = evaluate(Oracle(shift=2), heldout, 4, probe)
    assert c.loss != a.loss
