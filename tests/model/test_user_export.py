"""cellstream.model.user_export: what a user module must be (and the words when it is not), an unfaithful export
refused by the float64 rule, the metadata written, and `cellstream export --module` end to end."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from cellstream.model.export import ExportError
from cellstream.model.user_export import export_module
from cellstream.model.wrap import UnservableModule

REPO = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning"),
              pytest.mark.filterwarnings("ignore::DeprecationWarning")]


class Recurrent(nn.Module):
    """features (B, T, 3) -> per-step outputs, with any recurrent layer and head."""

    def __init__(self, rnn: nn.Module, head: nn.Module | None = None) -> None:
        super().__init__()
        self.rnn, self.head = rnn, head or nn.Linear(rnn.hidden_size * (2 if rnn.bidirectional else 1), 2)

    def forward(self, x: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]
                ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        y, state = self.rnn(x, state)
        return self.head(y), state


class LastStepOnly(Recurrent):
    def forward(self, x: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]
                ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        y, state = self.rnn(x, state)
        return self.head(y[:, -1]), state  # (B, V): a sequence classifier, not a per-step output


class LengthBranch(Recurrent):
    """Its computation depends on the sequence length in Python: the tracer freezes the branch it saw."""

    def forward(self, x: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]
                ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        y, state = self.rnn(x, state)
        return (self.head(y) * 2 if x.shape[1] > 4 else self.head(y)), state


@pytest.mark.parametrize(("module", "words"), [
    (Recurrent(nn.GRU(3, 8, batch_first=True)), "has no nn.LSTM (it has GRU: no cell state C)"),
    (Recurrent(nn.LSTM(3, 8, bidirectional=True, batch_first=True)), "bidirectional LSTM reads the future"),
    (Recurrent(nn.LSTM(3, 8, proj_size=4, batch_first=True), nn.Linear(4, 2)), "proj_size=4: h and C would differ"),
    (LastStepOnly(nn.LSTM(3, 8, batch_first=True)), "it must return one output vector per step"),
])
def test_unservable_modules_are_refused_with_the_reason(module, words, tmp_path):
    with pytest.raises(UnservableModule, match=re.escape(words)):
        export_module(module, tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


def test_an_unfaithful_export_is_refused_and_removed(tmp_path):
    torch.manual_seed(0)
    out = tmp_path / "branch.onnx"
    with pytest.raises(ExportError, match="the export is not the module's computation: outputs on random inputs"):
        export_module(LengthBranch(nn.LSTM(3, 8, batch_first=True)), out)
    assert not out.exists()


def test_metadata_and_signature(tmp_path):
    torch.manual_seed(0)
    out = tmp_path / "f.onnx"
    export_module(Recurrent(nn.LSTM(3, 8, 2, batch_first=True)), out, output_name="forecast",
                  metadata={"cellstream.description": "a test"})
    graph = onnx.load(str(out))
    meta = {p.key: p.value for p in graph.metadata_props}
    assert meta["cellstream.input_kind"] == "features" and meta["cellstream.feature_size"] == "3"
    assert (meta["cellstream.num_layers"], meta["cellstream.hidden_size"]) == ("2", "8")
    assert meta["cellstream.output"] == "forecast" and meta["cellstream.description"] == "a test"
    assert [i.name for i in graph.graph.input] == ["features", "h0", "c0"]
    assert [o.name for o in graph.graph.output] == ["forecast", "hn", "cn"]


def test_a_tokens_model_output_is_logits(tmp_path):
    class Tokens(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed, self.lstm, self.head = nn.Embedding(10, 4), nn.LSTM(4, 8), nn.Linear(8, 10)

        def forward(self, x: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]
                    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
            y, state = self.lstm(self.embed(x), state)
            return self.head(y), state

    with pytest.raises(UnservableModule, match="a tokens model's output is its logits"):
        export_module(Tokens(), tmp_path / "t.onnx", output_name="scores")
    classifier = Tokens()
    classifier.head = nn.Linear(8, 3)
    with pytest.raises(UnservableModule, match="the embedding has 10 tokens but the output 3 values per step"):
        export_module(classifier, tmp_path / "t.onnx")


USER_PACKAGE = '''
import torch
from torch import nn


class Spotter(nn.Module):
    """A keyword spotter as a user writes it: time-first LSTM over 4 features, MLP head over 3 classes."""

    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(4, 10, num_layers=2)
        self.head = nn.Sequential(nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 3))

    def forward(self, x, state):
        y, (h, c) = self.lstm(x, state)
        return self.head(y), h, c
'''


@pytest.mark.timeout(120)
def test_cli_exports_a_user_module_with_its_checkpoint(tmp_path):
    (tmp_path / "userpkg").mkdir()
    (tmp_path / "userpkg" / "__init__.py").write_text("")
    (tmp_path / "userpkg" / "spotter.py").write_text(textwrap.dedent(USER_PACKAGE))
    sys.path.insert(0, str(tmp_path))
    try:
        from userpkg.spotter import Spotter
    finally:
        sys.path.remove(str(tmp_path))
    torch.manual_seed(7)
    trained = Spotter().eval()
    torch.save({"state_dict": trained.state_dict()}, tmp_path / "spotter.pt")
    np.save(tmp_path / "samples.npy", np.random.default_rng(1).normal(size=(3, 50, 4)).astype(np.float32))
    result = subprocess.run(
        [sys.executable, "-m", "cellstream.service.cli", "export", "--module", "userpkg.spotter:Spotter",
         "--checkpoint", "spotter.pt", "--out", "spotter.onnx", "--output-name", "scores", "--samples", "samples.npy"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "wrote spotter.onnx" in result.stdout and "check-model spotter.onnx" in result.stdout
    # The file computes the checkpoint's weights (not the factory's fresh ones).
    x = np.random.default_rng(0).normal(size=(2, 9, 4)).astype(np.float32)
    zeros = np.zeros((2, 2, 10), np.float32)
    scores, hn, cn = ort.InferenceSession(str(tmp_path / "spotter.onnx")).run(
        None, {"features": x, "h0": zeros, "c0": zeros})
    with torch.no_grad():
        want, h, c = trained(torch.from_numpy(x).transpose(0, 1), (torch.from_numpy(zeros), torch.from_numpy(zeros)))
    np.testing.assert_allclose(scores, want.transpose(0, 1).numpy(), atol=1e-5)
    np.testing.assert_allclose(hn, h.numpy(), atol=1e-5)
    np.testing.assert_allclose(cn, c.numpy(), atol=1e-5)


def test_cli_names_a_missing_factory(tmp_path):
    result = subprocess.run([sys.executable, "-m", "cellstream.model.export", "--module", "no_such_pkg:make",
                             "--out", "x.onnx"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert ("cellstream export: error: cannot import 'no_such_pkg' (No module named 'no_such_pkg'); looked in the "
            f"current directory {tmp_path} and the installed packages") in result.stderr
    assert "run this from your project's root" in result.stderr


TIME_FIRST_TOKENS = '''
from torch import nn


class TimeFirst(nn.Module):
    """Embedding -> LSTM -> Linear, time-first (batch_first=False): x is (T, B) token ids."""

    def __init__(self):
        super().__init__()
        self.embed, self.lstm, self.head = nn.Embedding(40, 6), nn.LSTM(6, 8, num_layers=2), nn.Linear(8, 40)

    def forward(self, x, state):
        y, state = self.lstm(self.embed(x), state)
        return self.head(y), state
'''


@pytest.mark.timeout(120)
def test_cli_exports_a_time_first_token_model_with_its_gates(tmp_path):
    """Its exported graph transposes `tokens` before the embedding: the glass-box graph is read through that, so
    the model is served with gates (before: no glass-box graph, and `cellstream gates` refused the file)."""
    from cellstream.model.glassbox import path_for
    from cellstream.service.engine import Engine

    project = tmp_path / "project"
    (project / "lmpkg").mkdir(parents=True)
    (project / "lmpkg" / "__init__.py").write_text("")
    (project / "lmpkg" / "tf.py").write_text(textwrap.dedent(TIME_FIRST_TOKENS))
    export = [sys.executable, "-m", "cellstream.service.cli", "export", "--module", "lmpkg.tf:TimeFirst"]
    done = subprocess.run([*export, "--out", "tf.onnx"], cwd=project, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "wrote tf.gates.onnx (gates); worst scaled error" in done.stdout, done.stdout
    regated = subprocess.run([sys.executable, "-m", "cellstream.service.cli", "gates", "tf.onnx"], cwd=project,
                             capture_output=True, text=True, timeout=120)
    assert regated.returncode == 0, regated.stderr
    engine = Engine(project / "tf.onnx")
    assert engine.glass_box is not None and engine.glass_box.path == path_for(project / "tf.onnx")
    # The module is imported from the current directory: run elsewhere, the error says where it looked.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    lost = subprocess.run([*export, "--out", "x.onnx"], cwd=elsewhere, capture_output=True, text=True, timeout=120)
    assert lost.returncode == 2
    assert (f"cannot import 'lmpkg.tf' (No module named 'lmpkg'); looked in the current directory {elsewhere}"
            in lost.stderr), lost.stderr


def test_export_help_shows_the_module_options():
    done = subprocess.run([sys.executable, "-m", "cellstream.service.cli", "export", "--help"], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0
    for option in ("--module MODULE", "--checkpoint CHECKPOINT", "--output-name", "--samples", "--meta KEY=VALUE",
                   "--input {tokens,features}", "checkpoint written by `cellstream train`"):
        assert option in done.stdout, option
    assert "imported from the current directory" in " ".join(done.stdout.split())  # however the lines wrap


@pytest.mark.timeout(120)
def test_the_hand_export_of_the_models_guide_is_servable(tmp_path):
    """docs/MODELS.md's `torch.onnx.export` block, run as it stands (dynamo=False: torch's default exporter needs
    onnxscript), writes a file check-model accepts."""
    guide = (REPO / "docs" / "MODELS.md").read_text()
    section = guide[guide.index("## By hand, with `torch.onnx.export`"):]
    block = re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)
    assert "dynamo=False" in block
    done = subprocess.run([sys.executable, "-c", block], cwd=tmp_path, capture_output=True, text=True, timeout=100)
    assert done.returncode == 0, done.stderr
    checked = subprocess.run([sys.executable, "-m", "cellstream.service.cli", "check-model", "demand.onnx"],
                             cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0, checked.stderr
    assert "demand.onnx can be served" in checked.stdout
    assert "output   forecast float32 (batch, time, 1)" in checked.stdout
