"""Fixtures shared by tests/service and tests/e2e: a directory of tiny random ONNX models, and
redis-server processes of the tests' own.

The models have random weights on purpose: the service tests check plumbing and exact state carry
(server output == in-process onnxruntime on the same file), never the shipped model's quality.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from cellstream.model.parity import TOLERANCE, scaled_max_diff

# Test servers serve no HTTP unless a test asks (http_port=...): the default port, 8080, would be shared by
# every server the tests start, in-process or as a subprocess, and by anything else on the machine.
os.environ.setdefault("CELLSTREAM_HTTP_PORT", "0")

TINY_CHAT = "tiny-chat"  # tokens model: vocab 260 (byte tokenizer), 2 layers x 16 units
TINY_FEATURES = "tiny-features"  # features model: 5 floats per step, 2 layers x 12 units, 7 logits
END_TOKENS = {258, 259}  # eos, eot of the byte tokenizer


def _write_glass_box(state_dict: dict, input_kind: str, path: Path) -> None:
    """The glass-box graph (the gates) of the module whose weights are `state_dict`, beside `path`."""
    from cellstream.model import glassbox
    from cellstream.model.reference import ReferenceLSTM

    glassbox.write(ReferenceLSTM.from_state_dict({k: v.numpy() for k, v in state_dict.items()}), input_kind, path)


def _export_tokens_model(path: Path, seed: int = 1234, hidden_size: int = 16) -> None:
    import torch

    from cellstream.model.export import export_onnx, metadata_for
    from cellstream.model.network import LSTMLanguageModel, ModelConfig

    torch.manual_seed(seed)
    model = LSTMLanguageModel(ModelConfig(vocab_size=260, embed_dim=8, hidden_size=hidden_size, num_layers=2))
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_onnx(model, metadata_for(model, {"seed": 0, "step": 0, "corpus": "test"}), path)
    _write_glass_box(model.state_dict(), "tokens", path)


def _export_features_model(path: Path) -> None:
    import torch
    from torch import nn

    class FeaturesLSTM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lstm = nn.LSTM(input_size=5, hidden_size=12, num_layers=2, batch_first=True)
            self.head = nn.Linear(12, 7)

        def forward(
            self, features: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor
        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            out, (hn, cn) = self.lstm(features, (h0, c0))
            return self.head(out), hn, cn

    torch.manual_seed(4321)
    model = FeaturesLSTM().eval()
    sample = (torch.zeros(2, 3, 5), torch.zeros(2, 2, 12), torch.zeros(2, 2, 12))
    state_axes = {1: "batch"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            sample,
            str(path),
            dynamo=False,
            opset_version=17,
            input_names=["features", "h0", "c0"],
            output_names=["logits", "hn", "cn"],
            dynamic_axes={
                "features": {0: "batch", 1: "time"},
                "logits": {0: "batch", 1: "time"},
                "h0": state_axes,
                "c0": state_axes,
                "hn": state_axes,
                "cn": state_axes,
            },
        )
    _write_glass_box(model.state_dict(), "features", path)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model directory holding tiny-chat.onnx (tokens) and tiny-features.onnx (features), each with its
    glass-box graph (the gates)."""
    import torch

    torch.set_num_threads(1)  # 2 cores, maybe training in the background
    directory = tmp_path_factory.mktemp("tiny-models")
    _export_tokens_model(directory / f"{TINY_CHAT}.onnx")
    _export_features_model(directory / f"{TINY_FEATURES}.onnx")
    return directory


def _export_broken_model(path: Path) -> None:
    """A graph onnxruntime loads but the contract refuses: tokens and h0 in, no c0 (a GRU's signature)."""
    import onnx
    from onnx import TensorProto, helper

    tokens = helper.make_tensor_value_info("tokens", TensorProto.INT64, ["batch", "time"])
    h0 = helper.make_tensor_value_info("h0", TensorProto.FLOAT, [2, "batch", 16])
    outputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in ("logits", "hn")]
    nodes = [helper.make_node("Identity", ["h0"], ["hn"]), helper.make_node("Cast", ["tokens"], ["logits"], to=1)]
    graph = helper.make_graph(nodes, "broken", [tokens, h0], outputs)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


@pytest.fixture(scope="session")
def version_files(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> dict[str, Path]:
    """Model files to put in repositories as versions, each with its glass-box graph beside it: "v1" is
    tiny-chat itself (2 layers x 16 units), "v2" another tokens model (other weights, 2 x 24 units), "v1-shaped"
    other weights of v1's shape (a state of one would run on the other without an error), and "broken" a
    graph the contract refuses (no c0)."""
    directory = tmp_path_factory.mktemp("versions")
    for suffix in (".onnx", ".gates.onnx"):
        shutil.copy(tiny_model_dir / f"{TINY_CHAT}{suffix}", directory / f"v1{suffix}")
    _export_tokens_model(directory / "v2.onnx", seed=4242, hidden_size=24)
    _export_tokens_model(directory / "v1-shaped.onnx", seed=777)
    _export_broken_model(directory / "broken.onnx")
    return {name: directory / f"{name}.onnx" for name in ("v1", "v2", "v1-shaped", "broken")}


class Repository:
    """A model repository directory of a test's own, in Triton's layout (NAME/VERSION/model.onnx)."""

    def __init__(self, path: Path, files: dict[str, Path]) -> None:
        self.path = path
        self.files = files

    def add(self, name: str, version: int, source: str) -> Path:
        """NAME/VERSION/model.onnx (and its glass box, if the source has one) from version_files[source]."""
        folder = self.path / name / str(version)
        folder.mkdir(parents=True, exist_ok=True)
        graph = self.files[source]
        shutil.copy(graph, folder / "model.onnx")
        gates = graph.with_name(graph.stem + ".gates.onnx")
        if gates.exists():
            shutil.copy(gates, folder / "model.gates.onnx")
        return folder / "model.onnx"

    def remove(self, name: str, version: int) -> None:
        shutil.rmtree(self.path / name / str(version))

    def another(self, folder: str) -> Repository:
        """A second, empty repository beside this one (another replica's, say)."""
        path = self.path.parent / folder
        path.mkdir()
        return Repository(path, self.files)


@pytest.fixture
def repository(tmp_path: Path, version_files: dict[str, Path]) -> Repository:
    """An empty model repository (Repository) for this test."""
    path = tmp_path / "repository"
    path.mkdir()
    return Repository(path, version_files)


class RedisServer:
    """A redis-server process of the test's own on a free loopback port, data in a temp dir.

    Append-only file with fsync on every write, so `stop()` then `start()` (same port, same dir) is a
    Redis restart that keeps every acknowledged write, like a production Redis with persistence.
    """

    def __init__(self, directory: Path) -> None:
        self.binary = shutil.which("redis-server")
        if self.binary is None:
            pytest.fail("redis-server is not installed: `apt-get install -y redis-server` (.ci/run does it)")
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.directory = directory
        self.proc = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.directory),
             "--save", "", "--appendonly", "yes", "--appendfsync", "always", "--logfile", "redis.log"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"redis-server exited:\n{self.log()}"
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as conn:
                    conn.sendall(b"PING\r\n")
                    if conn.recv(64).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"redis-server not answering on {self.port}:\n{self.log()}")

    def stop(self, kill: bool = False) -> None:
        """SIGTERM (Redis flushes and exits) or SIGKILL; either way every acknowledged write is on disk."""
        if self.proc is not None and self.proc.poll() is None:
            (self.proc.kill if kill else self.proc.terminate)()
            self.proc.wait(20)

    def log(self) -> str:
        path = self.directory / "redis.log"
        return path.read_text() if path.exists() else ""


@pytest.fixture
def redis_server(tmp_path_factory: pytest.TempPathFactory):
    """A fresh redis-server for this test (see RedisServer); stopped afterwards."""
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop(kill=True)


class Reference:
    """In-process onnxruntime on the same .onnx files: the outputs the server must reproduce."""

    def __init__(self, model_dir: Path) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        self.sessions = {
            name: ort.InferenceSession(str(model_dir / f"{name}.onnx"), options, providers=["CPUExecutionProvider"])
            for name in (TINY_CHAT, TINY_FEATURES)
        }

    def zero_state(self, model: str) -> tuple[np.ndarray, np.ndarray]:
        shape = self.sessions[model].get_inputs()[1].shape  # h0 (L, B, H)
        zeros = np.zeros((shape[0], shape[2]), np.float32)
        return zeros, zeros.copy()

    def run(
        self, model: str, inputs: np.ndarray, h: np.ndarray | None = None, c: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One session, batch 1: inputs (T,) tokens or (T, F) features, h/c (L, H) -> logits (T, V), h, c."""
        if h is None or c is None:
            h, c = self.zero_state(model)
        kind = self.sessions[model].get_inputs()[0].name
        batch = np.asarray(inputs, dtype=np.int64 if kind == "tokens" else np.float32)[None]
        logits, hn, cn = self.sessions[model].run(
            ["logits", "hn", "cn"],
            {kind: batch, "h0": np.asarray(h, np.float32)[:, None], "c0": np.asarray(c, np.float32)[:, None]},
        )
        return logits[0], hn[:, 0], cn[:, 0]

    def greedy(self, prompt: str, max_tokens: int, h: np.ndarray | None = None, c: np.ndarray | None = None
               ) -> tuple[list[int], np.ndarray, np.ndarray]:
        """Greedy decoding on tiny-chat from (h, c): feed the prompt, then argmax and feed, token by token,
        until an end token (included) or max_tokens."""
        logits, h, c = self.run(TINY_CHAT, np.frombuffer(prompt.encode(), np.uint8).astype(np.int64), h, c)
        tokens: list[int] = []
        for _ in range(max_tokens):
            token = int(np.argmax(logits[-1]))
            tokens.append(token)
            logits, h, c = self.run(TINY_CHAT, np.array([token]), h, c)
            if token in END_TOKENS:
                break
        return tokens, h, c


def assert_close(got: np.ndarray, want: np.ndarray, what: str = "") -> None:
    diff = scaled_max_diff(np.asarray(got, np.float32), np.asarray(want, np.float32))
    assert diff <= TOLERANCE, f"{what}: scaled max diff {diff:.3g} > {TOLERANCE}"


@pytest.fixture(scope="session")
def ref(tiny_model_dir: Path) -> Reference:
    return Reference(tiny_model_dir)


@pytest.fixture
def close():
    """assert_close(got, want, what): scaled max diff within cellstream.model.parity.TOLERANCE."""
    return assert_close
