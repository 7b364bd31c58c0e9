import numpy as np
import pytest
import torch
from torch import nn

from cellstream.model.network import ModelConfig
from cellstream.model.parity import TOLERANCE, scaled_max_diff
from cellstream.model.reference import ReferenceLSTM

CONFIGS = [
    ModelConfig(vocab_size=260, embed_dim=8, hidden_size=16, num_layers=2),
    ModelConfig(vocab_size=260, embed_dim=5, hidden_size=7, num_layers=1),
    ModelConfig(vocab_size=260, embed_dim=8, hidden_size=16, num_layers=3),
]


def numpy_state(module):
    return {k: v.detach().numpy() for k, v in module.state_dict().items()}


def random_state(rng, layers, batch, hidden):
    shape = (layers, batch, hidden)
    return rng.normal(0, 0.7, shape).astype(np.float32), rng.normal(0, 2.0, shape).astype(np.float32)


def torch_gates(lstm, layer, x, h_prev):
    """torch's own gate pre-activations of one layer, split in torch's (i, f, g, o) order."""
    w_ih, w_hh = getattr(lstm, f"weight_ih_l{layer}"), getattr(lstm, f"weight_hh_l{layer}")
    b_ih, b_hh = getattr(lstm, f"bias_ih_l{layer}"), getattr(lstm, f"bias_hh_l{layer}")
    pre = x @ w_ih.T + b_ih + h_prev @ w_hh.T + b_hh
    i, f, g, o = pre.chunk(4, dim=1)
    return {
        "input": torch.sigmoid(i),
        "forget": torch.sigmoid(f),
        "candidate": torch.tanh(g),
        "output": torch.sigmoid(o),
    }


def test_parity_helper():
    want = np.array([0.5, -40.0])
    assert scaled_max_diff(want, want) == 0.0
    assert scaled_max_diff(np.array([0.5 + 2e-5, -40.0]), want) == pytest.approx(2e-5)
    assert scaled_max_diff(np.array([0.5, -40.0 + 4e-4]), want) == pytest.approx(1e-5)
    assert scaled_max_diff(np.zeros(3), np.zeros(2)) == float("inf")


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"E{c.embed_dim}H{c.hidden_size}L{c.num_layers}")
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_reference_matches_torch_step_by_step(make_model, config, seed):
    model = make_model(seed, config)
    ref = ReferenceLSTM.from_state_dict(numpy_state(model))
    assert len(ref.layers) == config.num_layers
    rng = np.random.default_rng(seed)
    batch, steps = 3, 25
    tokens = rng.integers(0, config.vocab_size, size=(batch, steps))
    h_np, c_np = random_state(rng, config.num_layers, batch, config.hidden_size)
    h_t, c_t = torch.from_numpy(h_np.copy()), torch.from_numpy(c_np.copy())
    tokens_t = torch.from_numpy(tokens)
    with torch.no_grad():
        for t in range(steps):
            logits_t, h_t_new, c_t_new = model(tokens_t[:, t : t + 1], h_t, c_t)
            x = ref.embedding[tokens[:, t]]
            h_new, c_new, gates = ref.step(x, h_np, c_np)
            logits = h_new[-1] @ ref.head_weight.T + ref.head_bias
            assert scaled_max_diff(logits, logits_t[:, 0].numpy()) <= TOLERANCE, t
            assert scaled_max_diff(h_new, h_t_new.numpy()) <= TOLERANCE, t
            assert scaled_max_diff(c_new, c_t_new.numpy()) <= TOLERANCE, t

            layer_input = model.embed(tokens_t[:, t])
            for k, g in enumerate(gates):
                # The gate equations, on the gates the reference reports.
                assert np.allclose(g.cell, g.forget * c_np[k] + g.input * g.candidate, atol=1e-6)
                assert np.allclose(g.hidden, g.output * np.tanh(g.cell), atol=1e-6)
                for gate in (g.forget, g.input, g.output):
                    assert gate.shape == (batch, config.hidden_size)
                    assert np.all((gate > 0) & (gate < 1))
                assert np.all(np.abs(g.candidate) < 1)
                # The same gates computed by torch from its own parameters.
                want = torch_gates(model.lstm, k, layer_input, h_t[k])
                for name, value in want.items():
                    assert scaled_max_diff(getattr(g, name), value.numpy()) <= TOLERANCE, (t, k, name)
                layer_input = torch.from_numpy(g.hidden)
            h_np, c_np, h_t, c_t = h_new, c_new, h_t_new, c_t_new
    # The state really moved: a stuck state would make the comparison above trivial.
    assert np.abs(c_np).max() > 0.1


@pytest.mark.parametrize("seed", [3, 4])
def test_reference_run_tokens_matches_torch_sequence(make_model, seed):
    model = make_model(seed)
    ref = ReferenceLSTM.from_state_dict(numpy_state(model))
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, 260, size=(2, 30))
    h0, c0 = random_state(rng, 2, 2, 16)
    logits, hn, cn = ref.run_tokens(tokens, h0, c0)
    with torch.no_grad():
        want = model(torch.from_numpy(tokens), torch.from_numpy(h0), torch.from_numpy(c0))
    for got, expected in zip((logits, hn, cn), want, strict=True):
        assert scaled_max_diff(got, expected.numpy()) <= TOLERANCE


@pytest.mark.parametrize(("input_size", "hidden", "layers"), [(5, 7, 1), (4, 9, 3)])
def test_reference_matches_bare_nn_lstm_on_float_inputs(input_size, hidden, layers):
    torch.manual_seed(input_size * 100 + layers)
    lstm = nn.LSTM(input_size, hidden, layers, batch_first=True)
    ref = ReferenceLSTM.from_state_dict(numpy_state(lstm), prefix="")
    assert ref.embedding is None and ref.head_weight is None
    rng = np.random.default_rng(layers)
    batch, steps = 4, 20
    x = rng.normal(0, 1.5, (batch, steps, input_size)).astype(np.float32)
    h, c = random_state(rng, layers, batch, hidden)
    with torch.no_grad():
        out, (hn, cn) = lstm(torch.from_numpy(x), (torch.from_numpy(h), torch.from_numpy(c)))
    for t in range(steps):
        h, c, gates = ref.step(x[:, t], h, c)
        assert scaled_max_diff(h[-1], out[:, t].numpy()) <= TOLERANCE, t
        assert len(gates) == layers
    assert scaled_max_diff(h, hn.numpy()) <= TOLERANCE
    assert scaled_max_diff(c, cn.numpy()) <= TOLERANCE
    with pytest.raises(ValueError, match="embedding and head"):
        ref.run_tokens(np.zeros((1, 1), dtype=np.int64), h, c)


def test_reference_refuses_a_state_dict_without_lstm(make_model):
    with pytest.raises(ValueError, match="no LSTM weights"):
        ReferenceLSTM.from_state_dict(numpy_state(make_model(0)), prefix="rnn.")
