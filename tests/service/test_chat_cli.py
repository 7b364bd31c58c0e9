"""`cellstream chat` as a user runs it: a subprocess typing into a live server's session."""

from __future__ import annotations

import asyncio
import sys

CHAT = [sys.executable, "-m", "cellstream.service.cli", "chat"]


async def run_chat(port: int, stdin: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        *CHAT, "--target", f"127.0.0.1:{port}", "--max-tokens", "5",
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(stdin.encode()), 60)
    return process.returncode, out.decode(), err.decode()


async def test_chat_keeps_one_session_across_turns_and_closes_it(server, scrape):
    code, out, err = await run_chat(server.port, "hello\nhow are you?\n\n")
    assert code == 0, err
    assert "Traceback" not in err
    assert out.count("bot> ") == 2
    assert out.startswith("session ")
    samples = await scrape(server)
    assert samples.get("cellstream_sessions_opened_total") == 1
    assert samples.get("cellstream_sessions_closed_total") == 1
    assert samples.get("cellstream_sessions_active") == 0
    # Both turns went to the one session, as two turns of the client's GenerateMany stream: prompt bytes + 5
    # sampled tokens each.
    turns = len(b"user: hello\nbot: ") + len(b"user: how are you?\nbot: ") + 2 * 5
    assert samples.get("cellstream_requests_total", method="GenerateMany", code="OK") == 1
    assert samples.get("cellstream_items_total", method="GenerateMany", code="OK") == 2
    assert samples.get("cellstream_tokens_total", model="tiny-chat") == turns


async def test_chat_against_no_server_fails_cleanly():
    code, _, err = await run_chat(1, "hello\n")
    assert code == 1
    assert "cannot open a session" in err and "UNAVAILABLE" in err
    assert "Traceback" not in err
