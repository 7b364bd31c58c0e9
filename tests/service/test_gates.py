"""The LSTM's gates through the API (issue 17): equal to the NumPy reference of the gate equations in float64
for any split of the input, the state advancing exactly as without gates, and every refusal precise and
harmless (no glass-box graph, too many steps, a multiplexed item, a glass-box graph of other weights)."""

from __future__ import annotations

import itertools
import shutil
from pathlib import Path

import grpc
import httpx
import numpy as np
import onnx
import pytest

from cellstream.bench.server import free_ports
from cellstream.model import glassbox
from cellstream.model.parity import TOLERANCE, scaled_max_diff
from cellstream.model.reference import ReferenceLSTM
from cellstream.service._proto.cellstream.v1 import inference_pb2 as pb
from cellstream.service.errors import ModelLoadError
from cellstream.service.gates import GATE_NAMES

CHAT, FEATURES = "tiny-chat", "tiny-features"
SIGMOIDS = ("forget", "input", "output")
# Exactly 1 (or 0) from σ only where the exact value is this close: a few float32 steps (6e-8 each just below 1),
# as onnxruntime's vectorised σ rounds.
NEAR_THE_END = 1e-6
# The bound docs/API.md states for the gates against float64 over a conversation's first max_gate_steps bytes
# (float32's drift through a trained memory: 1.17e-5 was seen on a 256-byte UTF-8 input of the shipped model;
# `python -m cellstream.bench.gate_precision` measures it).
GATE_BOUND_STATED = "5e-5"
GATE_BOUND = float(GATE_BOUND_STATED)

pytestmark = pytest.mark.timeout(120)


def reference_of(model_dir: Path, model: str) -> ReferenceLSTM:
    """The float64 NumPy reference of a served model, its weights read from the fast graph (not the glass box)."""
    reference, _ = glassbox.reference_from_graph(onnx.load(str(model_dir / f"{model}.onnx")))
    return glassbox.in_float64(reference)


def expected_gates(reference: ReferenceLSTM, inputs: np.ndarray) -> dict[str, np.ndarray]:
    """name -> (T, L, H) of one sequence from a zero state, in float64."""
    layers, hidden = len(reference.layers), reference.layers[0].W_f.shape[0]
    zeros = np.zeros((layers, 1, hidden))
    x = inputs[None] if inputs.dtype == np.int64 else inputs[None].astype(np.float64)
    return {name: values[:, :, 0] for name, values in glassbox.reference_gates(reference, x, zeros, zeros).items()}


def served_gates(responses: list[pb.LayerGates], hidden: int) -> dict[str, np.ndarray]:
    """name -> (T, L, H) from the LayerGates of one reply (a list per layer, each field step-major)."""
    return {name: np.stack([np.asarray(getattr(layer, name), np.float32).reshape(-1, hidden) for layer in responses],
                           axis=1) for name in GATE_NAMES}


def joined(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {name: np.concatenate([part[name] for part in parts]) for name in GATE_NAMES}


def assert_gates(got: dict[str, np.ndarray], want: dict[str, np.ndarray], what: str) -> None:
    for name in GATE_NAMES:
        assert got[name].shape == want[name].shape, (what, name, got[name].shape, want[name].shape)
        diff = scaled_max_diff(got[name], want[name])
        assert diff <= GATE_BOUND, f"{what}: {name} is {diff:.3g} from the float64 reference"
    for name in SIGMOIDS:
        # σ is in (0, 1); float32 rounds it to exactly 1 (or 0) only where the exact value is that close to it.
        assert ((got[name] >= 0) & (got[name] <= 1)).all(), f"{what}: {name} outside [0, 1]"
        rounded = (got[name] == 0) | (got[name] == 1)
        assert (np.abs(got[name] - want[name])[rounded] <= NEAR_THE_END).all(), f"{what}: {name} ends clipped"


def model_inputs(model: str, steps: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if model == CHAT:
        return rng.integers(0, 256, steps, dtype=np.int64)
    return rng.normal(0, 1, (steps, 5)).astype(np.float32)


def step_kwargs(model: str, part: np.ndarray) -> dict:
    return {"tokens": part.tolist()} if model == CHAT else {"features": part}


SPLITS = {"whole": [23], "byte by byte": [1] * 23, "uneven": [5, 1, 9, 8]}


@pytest.mark.parametrize("model", [CHAT, FEATURES])
@pytest.mark.parametrize("split", list(SPLITS))
async def test_gates_equal_the_float64_reference_for_any_split(stub, tiny_model_dir, arrays, model, split, step):
    inputs = model_inputs(model, 23, seed=7)
    session = (await stub.OpenSession(pb.OpenSessionRequest(model=model))).session_id
    plain = (await stub.OpenSession(pb.OpenSessionRequest(model=model))).session_id
    parts, start = [], 0
    for length in SPLITS[split]:
        part = inputs[start:start + length]
        start += length
        response = await stub.Step(step(session, **step_kwargs(model, part), gates=True))
        assert len(response.gates) == 2
        hidden = len(response.gates[0].forget) // length
        parts.append(served_gates(response.gates, hidden))
        await stub.Step(step(plain, **step_kwargs(model, part)))
    got = joined(parts)
    assert_gates(got, expected_gates(reference_of(tiny_model_dir, model), inputs), f"{model} split {split}")
    h, c = arrays(await stub.GetState(pb.SessionRef(session_id=session)))
    assert scaled_max_diff(got["cell"][-1], c) <= TOLERANCE and scaled_max_diff(got["hidden"][-1], h) <= TOLERANCE
    # Asking for gates advanced the state as a step without them does.
    h_plain, c_plain = arrays(await stub.GetState(pb.SessionRef(session_id=plain)))
    assert scaled_max_diff(h, h_plain) <= TOLERANCE and scaled_max_diff(c, c_plain) <= TOLERANCE


async def test_gates_on_a_stream_of_steps(stub, tiny_model_dir):
    inputs = model_inputs(CHAT, 12, seed=3)
    session = (await stub.OpenSession(pb.OpenSessionRequest(model=CHAT))).session_id
    call = stub.StreamSteps()
    for k, part in enumerate(np.split(inputs, [4, 5, 12])[:3]):
        request = pb.StepRequest(session_id=session if k == 0 else "", tokens=pb.TokenSequence(ids=part.tolist()),
                                 want=pb.Outputs(gates=True))
        await call.write(request)
    await call.done_writing()
    parts = [served_gates(response.gates, 16) async for response in call]
    assert_gates(joined(parts), expected_gates(reference_of(tiny_model_dir, CHAT), inputs), "StreamSteps")


async def test_generate_with_gates_covers_every_byte_fed(stub, tiny_model_dir):
    session = (await stub.OpenSession(pb.OpenSessionRequest(model=CHAT))).session_id
    prompt = "user: my name is alice.\nbot: "
    request = pb.GenerateRequest(session_id=session, prompt=prompt, max_tokens=12, gates=True)
    chunks = [chunk async for chunk in stub.Generate(request)]
    fed = list(prompt.encode())
    parts = []
    for k, chunk in enumerate(chunks):
        gates = served_gates(chunk.gates, 16)
        assert len(gates["forget"]) == (len(prompt.encode()) if k == 0 else 0) + len(chunk.tokens), k
        parts.append(gates)
        fed += chunk.tokens
    assert chunks[-1].position == len(fed)
    assert_gates(joined(parts), expected_gates(reference_of(tiny_model_dir, CHAT), np.array(fed, np.int64)),
                 "Generate")


@pytest.fixture
async def bare(start, tmp_path, tiny_model_dir):
    """A server of tiny-chat alone, without its glass-box graph, with its JSON face."""
    shutil.copy(tiny_model_dir / f"{CHAT}.onnx", tmp_path)
    [port] = free_ports(1)
    return await start(model_dir=tmp_path, http_port=port)


async def test_list_models_says_which_models_have_gates(stub, bare, connect):
    models = (await stub.ListModels(pb.ListModelsRequest())).models
    assert {m.name: m.gates for m in models} == {CHAT: True, FEATURES: True}
    assert [(m.name, m.gates) for m in (await connect(bare).ListModels(pb.ListModelsRequest())).models] == [
        (CHAT, False)]


async def test_gates_without_a_glass_box_graph_fail_precondition_and_change_nothing(bare, connect, step, reply):
    stub = connect(bare)
    session = (await stub.OpenSession(pb.OpenSessionRequest())).session_id
    await stub.Step(step(session, tokens=[1, 2, 3]))
    for call in (lambda: stub.Step(step(session, tokens=[4, 5], gates=True)),
                 lambda: reply(stub, session, "user: hi\nbot: ", max_tokens=3, gates=True)):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await call()
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "without a glass-box graph" in refused.value.details()
        assert "cellstream export" in refused.value.details() and "cellstream gates" in refused.value.details()
        assert (await stub.GetState(pb.SessionRef(session_id=session))).position == 3
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{bare.http_port}", timeout=30) as http:
        answer = await http.post(f"/v1/sessions/{session}/step", json={"text": "hi", "want": {"gates": True}})
    assert answer.status_code == 400 and "without a glass-box graph" in answer.json()["error"]
    assert (await stub.GetState(pb.SessionRef(session_id=session))).position == 3


async def test_gates_past_max_gate_steps_are_refused_and_change_nothing(start, connect, step, reply):
    stub = connect(await start(max_gate_steps=8))
    session = (await stub.OpenSession(pb.OpenSessionRequest())).session_id
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.Step(step(session, tokens=list(range(9)), gates=True))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "9 steps, more than max_gate_steps (8)" in refused.value.details()
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await reply(stub, session, "123456789", max_tokens=2, gates=True)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "max_gate_steps" in refused.value.details()
    assert (await stub.GetState(pb.SessionRef(session_id=session))).position == 0
    ok = await stub.Step(step(session, tokens=list(range(8)), gates=True))  # the bound itself is fine
    assert ok.position == 8 and len(ok.gates[0].cell) == 8 * 16


async def test_outputs_that_would_not_fit_in_one_reply_are_refused_before_the_step(start, connect, step):
    # tiny-chat: 2 layers x 16 units x 6 gates x 4 bytes = 768 bytes a step; (20,000 - 4,096) // 768 = 20 fit.
    [port] = free_ports(1)
    running = await start(max_message_bytes=20_000, http_port=port)
    stub = connect(running)
    session = (await stub.OpenSession(pb.OpenSessionRequest())).session_id
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.Step(step(session, tokens=[1] * 21, gates=True))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "gates of 21 steps of model 'tiny-chat' (768 bytes a step) would exceed max_message_bytes (20000): " \
           "at most 20 steps per request" in refused.value.details()
    assert (await stub.GetState(pb.SessionRef(session_id=session))).position == 0
    ok = await stub.Step(step(session, tokens=[1] * 20, gates=True))
    assert ok.position == 20 and len(ok.gates[1].hidden) == 20 * 16
    # An HTTP reply has no such bound: the JSON face answers what gRPC could not send.
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
        body = {"tokens": {"ids": [1] * 21}, "want": {"gates": True}}
        reply = await http.post(f"/v1/sessions/{session}/step", json=body)
    assert reply.status_code == 200 and len(reply.json()["gates"][0]["cell"]) == 21 * 16
    session = (await stub.OpenSession(pb.OpenSessionRequest())).session_id
    await stub.Step(step(session, tokens=[1] * 20))
    # Every step's logits (all_steps) weigh 260 x 4 = 1,040 bytes a step: 15 fit; with gates 1,808: 8.
    for kwargs, fitting in (({"all_steps": True}, 15), ({"all_steps": True, "gates": True}, 8)):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.Step(step(session, tokens=[1] * (fitting + 1), **kwargs))
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert f"at most {fitting} steps per request" in refused.value.details()
        assert (await stub.GetState(pb.SessionRef(session_id=session))).position == 20
        ok = await stub.Step(step(session, tokens=[1] * fitting, **kwargs))
        assert len(ok.logits) == fitting * 260
        session = (await stub.OpenSession(pb.OpenSessionRequest())).session_id
        await stub.Step(step(session, tokens=[1] * 20))


async def test_a_multiplexed_item_asking_for_gates_is_refused_alone(stub):
    a, b = [(await stub.OpenSession(pb.OpenSessionRequest())).session_id for _ in range(2)]
    result = await stub.StepMany(pb.StepBatch(items=[
        pb.StepRequest(session_id=a, tokens=pb.TokenSequence(ids=[1, 2]), want=pb.Outputs(gates=True), tag=1),
        pb.StepRequest(session_id=b, tokens=pb.TokenSequence(ids=[1, 2]), tag=2),
    ]))
    refused, applied = result.items
    assert refused.WhichOneof("outcome") == "error" and refused.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "send this item as a Step" in refused.error.message
    assert applied.response.position == 2
    assert (await stub.GetState(pb.SessionRef(session_id=a))).position == 0


async def test_the_json_face_returns_the_same_gates(start, connect, step):
    [port] = free_ports(1)
    running = await start(http_port=port)
    stub = connect(running)
    a, b = [(await stub.OpenSession(pb.OpenSessionRequest())).session_id for _ in range(2)]
    by_grpc = await stub.Step(step(a, text="hello", gates=True))
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
        reply = await http.post(f"/v1/sessions/{b}/step", json={"text": "hello", "want": {"gates": True}})
    assert reply.status_code == 200, reply.text
    layers = reply.json()["gates"]
    assert len(layers) == 2
    for name in GATE_NAMES:
        for layer, expected in zip(layers, by_grpc.gates, strict=True):
            np.testing.assert_allclose(layer[name], getattr(expected, name), rtol=0, atol=1e-6)


def other_weights_glass_box(tiny_model_dir: Path, directory: Path) -> None:
    """tiny-chat.onnx beside a glass-box graph of other (perturbed) weights."""
    shutil.copy(tiny_model_dir / f"{CHAT}.onnx", directory)
    reference, kind = glassbox.reference_from_graph(onnx.load(str(tiny_model_dir / f"{CHAT}.onnx")))
    layer = reference.layers[0]
    shifted = type(layer)(**(vars(layer) | {"b_f": layer.b_f + 0.5}))
    other = ReferenceLSTM((shifted, *reference.layers[1:]), reference.embedding)
    glassbox.write(other, kind, directory / "tiny-chat.onnx")


async def test_a_glass_box_graph_of_other_weights_stops_the_start(start, tmp_path, tiny_model_dir):
    other_weights_glass_box(tiny_model_dir, tmp_path)
    with pytest.raises(ModelLoadError, match=r"tiny-chat\.gates\.onnx ends .* away from tiny-chat\.onnx's state"):
        await start(model_dir=tmp_path)


async def test_an_unreadable_glass_box_graph_stops_the_start(start, tmp_path, tiny_model_dir):
    shutil.copy(tiny_model_dir / f"{CHAT}.onnx", tmp_path)
    (tmp_path / "tiny-chat.gates.onnx").write_bytes(b"not a graph")
    with pytest.raises(ModelLoadError, match=r"tiny-chat\.gates\.onnx: onnxruntime cannot load it"):
        await start(model_dir=tmp_path)


ARTIFACTS = Path(__file__).resolve().parents[2] / "model" / "artifacts"


# 256 bytes of held-out dialogues (the most one request with gates may have): the first, fed whole, is 1.95e-5 from
# float64 at its worst (more than 1e-5, the bound docs/API.md stated before); the second has accents (UTF-8).
SHIPPED_TEXTS = (
    "user: hello!\nbot: hello! how can i help?\nuser: my name is oscar.\nbot: hello oscar!\nuser: i work as a "
    "sailor.\nbot: being a sailor must be interesting.\nuser: these days i live in oslo.\nbot: oslo sounds lovely."
    "\nuser: how was your lamp?\nbot: maybe you should g",
    ("user: je m'appelle amélie.\nbot: c'est noté, amélie.\nuser: j'habite à genève.\nbot: genève !\n"
     "user: je travaille comme infirmière.\nbot: infirmière, très bien.\nuser: il pleut aujourd'hui.\n"
     "bot: je préfère le soleil.\nuser: comment je m'appelle ?\nbot: ").encode()[:256].decode(errors="ignore"),
)


@pytest.mark.parametrize(("text", "cuts"), [(SHIPPED_TEXTS[0], ()), (SHIPPED_TEXTS[1], (9, 10))],
                         ids=["256 bytes whole", "256 UTF-8 bytes in pieces"])
async def test_the_shipped_models_gates_equal_the_float64_reference(start, connect, arrays, step, text, cuts):
    stub = connect(await start(model_dir=ARTIFACTS, default_model="cellstream-chat"))
    assert 250 <= len(text.encode()) <= 256
    session = (await stub.OpenSession(pb.OpenSessionRequest())).session_id
    parts = []
    for start_at, stop_at in itertools.pairwise((0, *cuts, len(text))):
        response = await stub.Step(step(session, text=text[start_at:stop_at], gates=True))
        parts.append(served_gates(response.gates, 128))
    got = joined(parts)
    fed = np.frombuffer(text.encode(), np.uint8).astype(np.int64)
    assert_gates(got, expected_gates(reference_of(ARTIFACTS, "cellstream-chat"), fed), "cellstream-chat")
    h, c = arrays(await stub.GetState(pb.SessionRef(session_id=session)))
    assert scaled_max_diff(got["cell"][-1], c) <= TOLERANCE and scaled_max_diff(got["hidden"][-1], h) <= TOLERANCE


async def test_the_shipped_sensor_models_gates_equal_the_float64_reference(start, connect, step):
    stub = connect(await start(model_dir=ARTIFACTS, default_model="cellstream-chat"))
    readings = np.sin(np.arange(40) / 3).astype(np.float32)[:, None]
    sensor = (await stub.OpenSession(pb.OpenSessionRequest(model="cellstream-sensor"))).session_id
    response = await stub.Step(step(sensor, features=readings, gates=True))
    assert len(response.gates) == 1
    want = expected_gates(reference_of(ARTIFACTS, "cellstream-sensor"), readings)
    assert_gates(served_gates(response.gates, 48), want, "cellstream-sensor")


def test_the_api_states_the_bound_the_tests_hold():
    api = (Path(__file__).resolve().parents[2] / "docs" / "API.md").read_text()
    assert f"within **{GATE_BOUND_STATED}**" in api
