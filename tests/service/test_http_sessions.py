"""The native sessions over JSON: every per-request RPC, a session shared by both transports, Generate as
server-sent events equal to the gRPC Generate token for token, a client that disconnects mid-turn leaving
the state where a cancelled gRPC Generate leaves it, and the README's curl block run as it stands."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import re
import subprocess
from pathlib import Path

import httpx
import numpy as np
import pytest

from cellstream.bench.server import free_ports
from cellstream.service._proto.cellstream.v1 import inference_pb2 as pb

CHAT = "tiny-chat"
REPO = Path(__file__).resolve().parents[2]
GENERATE_ROUTE = "/v1/sessions/{session_id}/generate"

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
async def server(start):
    [port] = free_ports(1)
    return await start(http_port=port)


async def ok(response: httpx.Response) -> dict:
    assert response.status_code == 200, response.text
    return response.json()


def state_of(document: dict) -> tuple[np.ndarray, np.ndarray]:
    shape = (document["num_layers"], document["hidden_size"])
    return np.asarray(document["h"], np.float32).reshape(shape), np.asarray(document["c"], np.float32).reshape(shape)


def events(text: str) -> list[tuple[str, dict]]:
    """(name, data) of each server-sent event of a reply."""
    found = []
    for block in text.strip().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines())
        found.append((fields["event"], json.loads(fields["data"])))
    return found


async def test_every_session_rpc_over_json(server, http, ref, close):
    models = await ok(await http.get("/v1/models"))
    assert models["default_model"] == CHAT
    assert {m["name"] for m in models["models"]} == {CHAT, "tiny-features"}
    opened = await ok(await http.post("/v1/sessions", content=b""))  # an empty body: the defaults
    assert opened["model"] == CHAT and opened["position"] == "0"
    sid = opened["session_id"]

    ids = [10, 20, 30, 40, 50]
    stepped = await ok(await http.post(f"/v1/sessions/{sid}/step", json={
        "tokens": {"ids": ids[:2]}, "want": {"logits": True, "top_k": 3, "state": True}}))
    assert stepped["position"] == "2" and len(stepped["top"]) == 3
    # camelCase field names are the JSON mapping's too; the path names the session.
    stepped = await ok(await http.post(f"/v1/sessions/{sid}/step", json={
        "tokens": {"ids": ids[2:]}, "expectedPosition": "2", "want": {"allSteps": True}}))
    logits = np.asarray(stepped["logits"], np.float32).reshape(3, 260)
    want_logits, want_h, want_c = ref.run(CHAT, np.array(ids))
    close(logits, want_logits[2:], "logits of the second step")

    state = await ok(await http.get(f"/v1/sessions/{sid}/state"))
    assert state["position"] == "5" and state["model"] == CHAT
    h, c = state_of(state)
    close(h, want_h, "h")
    close(c, want_c, "c")

    fork = await ok(await http.post(f"/v1/sessions/{sid}/fork", json={"ttl_seconds": 60}))
    assert fork["session_id"] != sid and fork["position"] == "5"
    closed = await ok(await http.delete(f"/v1/sessions/{sid}"))
    assert closed == {"position": "5"}
    gone = await http.get(f"/v1/sessions/{sid}/state")
    assert gone.status_code == 404 and "not found" in gone.json()["error"]
    forked = await ok(await http.get(f"/v1/sessions/{fork['session_id']}/state"))
    close(state_of(forked)[0], want_h, "the fork's h")


async def test_a_session_is_stepped_over_either_transport(server, http, stub, ref, close, arrays, step):
    sid = (await stub.OpenSession(pb.OpenSessionRequest())).session_id
    await stub.Step(step(sid, tokens=[1, 2, 3]))
    await ok(await http.post(f"/v1/sessions/{sid}/step", json={"text": "hi"}))
    await stub.Step(step(sid, tokens=[4]))
    over_http = await ok(await http.post(f"/v1/sessions/{sid}/step", json={"tokens": {"ids": [5]},
                                                                        "want": {"state": True}}))
    _, want_h, want_c = ref.run(CHAT, np.array([1, 2, 3, *b"hi", 4, 5]))
    h, _ = arrays(await stub.GetState(pb.SessionRef(session_id=sid)))
    close(h, want_h, "h read over gRPC")
    close(state_of(over_http["state"])[1], want_c, "c returned over HTTP")
    assert (await stub.GetState(pb.SessionRef(session_id=sid))).position == int(over_http["position"]) == 7


async def test_a_streamed_turn_equals_the_grpc_generate(server, http, stub, close, arrays, step):
    """Two copies of one session, the same seeded turn: over HTTP as server-sent events, over gRPC as a
    stream of GenerateChunk. The same tokens in the same chunks, the same ends, the same states."""
    sid = (await stub.OpenSession(pb.OpenSessionRequest())).session_id
    await stub.Step(step(sid, text="user: hello there\n"))
    twin = (await stub.ForkSession(pb.ForkSessionRequest(session_id=sid))).session_id
    turn = {"prompt": "bot: ", "max_tokens": 40, "temperature": 0.9, "seed": 1234}

    response = await http.post(f"/v1/sessions/{sid}/generate", json=turn)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    streamed = events(response.text)
    chunks = [chunk async for chunk in stub.Generate(pb.GenerateRequest(session_id=twin, **turn))]

    assert [name for name, _ in streamed] == ["chunk"] * (len(streamed) - 1) + ["done"]
    assert [data["tokens"] for _, data in streamed] == [list(c.tokens) for c in chunks]
    assert [(data["text"], int(data["position"]), data["done"], data["finish_reason"]) for _, data in streamed] == [
        (c.text, c.position, c.done, c.finish_reason) for c in chunks]
    assert streamed[-1][1]["finish_reason"] in ("length", "end_token", "stop")
    assert sum(len(data["tokens"]) for _, data in streamed) > 1
    (h, c), (twin_h, twin_c) = [arrays(await stub.GetState(pb.SessionRef(session_id=s))) for s in (sid, twin)]
    close(h, twin_h, "h after the turn")
    close(c, twin_c, "c after the turn")



async def test_a_client_that_disconnects_stops_the_turn_as_grpc_does(server, http, stub, scrape, eventually,
                                                                    ref, arrays, close, hold_run, step):
    """A greedy turn whose 6th model run (the prompt, then a token per run) is held: the client reads the first
    chunk, goes away while the run is held; the server stops the turn. Over gRPC (the call cancelled) and over
    HTTP (the connection closed) the session ends at the same position, with the state of what was fed."""
    batcher = server.dataplane.batchers[CHAT]
    batcher.inline_max_tokens = 0  # the held engine blocks: never on the event loop
    engine = batcher.engine
    prompt, max_tokens = "user: hi\nbot: ", 200
    tokens, _, _ = ref.greedy(prompt, max_tokens)
    assert len(tokens) > 10, "the reference turn ends too soon to be cut"
    ended: dict[str, int] = {}

    async def cut(transport: str) -> None:
        sid = (await stub.OpenSession(pb.OpenSessionRequest())).session_id
        hold = batcher.engine = hold_run(engine, 6)
        if transport == "grpc":
            call = stub.Generate(pb.GenerateRequest(session_id=sid, prompt=prompt, max_tokens=max_tokens))
            await call.read()
            await asyncio.to_thread(hold.running.wait, 20)
            call.cancel()

            async def noticed() -> bool:
                samples = await scrape(server)
                return samples.get("cellstream_requests_total", 0.0, method="Generate", code="CANCELLED") == 1
        else:
            body = {"prompt": prompt, "max_tokens": max_tokens}
            async with http.stream("POST", f"/v1/sessions/{sid}/generate", json=body) as response:
                assert response.status_code == 200
                lines = response.aiter_lines()
                assert (await anext(lines)).startswith("event: chunk")
                await asyncio.to_thread(hold.running.wait, 20)

            async def noticed() -> bool:
                samples = await scrape(server)
                return samples.get("cellstream_http_requests_total", 0.0, route=GENERATE_ROUTE, code="499") == 1
        await eventually(noticed, f"the server stops the {transport} turn")
        hold.open.set()
        batcher.engine = engine
        after = (await stub.OpenSession(pb.OpenSessionRequest())).session_id
        await stub.Step(step(after, tokens=[1]))  # runs after the held batch
        state = await stub.GetState(pb.SessionRef(session_id=sid))
        ended[transport] = state.position
        _, want_h, want_c = ref.run(CHAT, np.array([*prompt.encode(), *tokens])[: state.position])
        h, c = arrays(state)
        close(h, want_h, f"{transport}: h of what was fed")
        close(c, want_c, f"{transport}: c of what was fed")

    await cut("grpc")
    await cut("http")
    assert ended["http"] == ended["grpc"]
    assert ended["http"] < len(prompt.encode()) + max_tokens, "the turn went on after the client left"


async def test_the_readme_curl_block_runs_as_it_stands(start, tmp_path):
    """The README's curl commands, verbatim, against a server on the shipped model. curl's configuration
    (CURL_HOME) sends 127.0.0.1:8080 to this server's port: the commands are not edited."""
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("### HTTP: KServe v2 REST"):]
    block = re.search(r"```sh\n(.*?)```", section, re.DOTALL).group(1)
    assert "127.0.0.1:8080" in block
    [port] = free_ports(1)
    running = await start(http_port=port, model_dir=REPO / "model" / "artifacts", default_model="cellstream-chat")
    (tmp_path / ".curlrc").write_text(f'connect-to = "127.0.0.1:8080:127.0.0.1:{running.http_port}"\n')
    env = {**os.environ, "CURL_HOME": str(tmp_path)}
    result = await asyncio.to_thread(subprocess.run, ["bash", "-euo", "pipefail", "-c", block], env=env,
                                     capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == '{"ready":true}'
    stepped = json.loads(lines[1])
    assert stepped["position"] == "24" and len(stepped["top"]) == 2
    done = [json.loads(line.removeprefix("data: ")) for prev, line in itertools.pairwise(lines)
            if prev == "event: done"]
    assert len(done) == 1 and done[0]["finish_reason"] in ("stop", "length", "end_token")
    position = int(done[0]["position"])
    assert position > 24 + len("bot: ")
    assert f'"{position}"' in lines, "the state's position is the end of the turn"
    assert json.loads(next(line for line in lines if line.startswith('{"position"'))) == {"position": str(position)}
    assert lines[-1] == "[1,3,260]"


async def test_the_openapi_document_describes_every_route(server, http):
    document = await ok(await http.get("/openapi.json"))
    assert document["openapi"].startswith("3.")
    paths = document["paths"]
    for path, method in (("/v1/sessions/{session_id}/step", "post"), ("/v1/sessions/{session_id}/generate", "post"),
                         ("/v1/sessions/{session_id}", "delete"), ("/v2/models/{model}/infer", "post"),
                         ("/v2/models/{model}/versions/{version}/infer", "post"), ("/v2/health/ready", "get")):
        assert method in paths[path], (path, method)
    schemas = document["components"]["schemas"]
    refs = set(re.findall(r'"#/components/schemas/([^"]+)"', json.dumps(document)))
    assert refs <= set(schemas), f"dangling references: {refs - set(schemas)}"
    step = schemas["cellstream.v1.StepRequest"]["properties"]
    assert {"session_id", "tokens", "text", "features", "expected_position", "want"} <= set(step)
    assert step["tokens"] == {"$ref": "#/components/schemas/cellstream.v1.TokenSequence",
                              "description": "one of tokens, text, features"}
    assert schemas["cellstream.v1.SessionInfo"]["properties"]["expires_at"]["format"] == "date-time"
    generate = paths["/v1/sessions/{session_id}/generate"]["post"]["responses"]["200"]["content"]
    assert list(generate) == ["text/event-stream"]
    assert paths["/v1/models"]["get"]["security"] == [{"bearer": []}]
    assert "security" not in paths["/v2/health/ready"]["get"]


async def test_a_turn_past_its_deadline_ends_with_an_error_event(server, http, stub, scrape, hold_run):
    """The reply has begun (200, first chunk) when the held model makes the turn outlive Request-Timeout-Ms:
    it ends with `event: error` carrying 504, and is counted 504, not 200."""
    batcher = server.dataplane.batchers[CHAT]
    batcher.inline_max_tokens = 0  # the held engine blocks: never on the event loop
    engine = batcher.engine
    hold = batcher.engine = hold_run(engine, 4)
    sid = (await stub.OpenSession(pb.OpenSessionRequest())).session_id
    body = {"prompt": "user: hi\nbot: ", "max_tokens": 50}
    async with http.stream("POST", f"/v1/sessions/{sid}/generate", json=body,
                           headers={"Request-Timeout-Ms": "1500"}) as response:
        assert response.status_code == 200
        lines = response.aiter_lines()
        first = await anext(lines)
        assert first.startswith("event: chunk")
        await asyncio.to_thread(hold.running.wait, 20)
        rest = [line async for line in lines]
    hold.open.set()
    batcher.engine = engine
    [(name, data)] = [e for e in events("\n".join([first, *rest])) if e[0] != "chunk"]
    assert name == "error" and data["status"] == 504 and "deadline exceeded" in data["error"]
    samples = await scrape(server)
    assert samples.get("cellstream_http_requests_total", route=GENERATE_ROUTE, code="504") == 1
