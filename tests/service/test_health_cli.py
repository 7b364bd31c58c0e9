"""`cellstream health` against live servers: its exit status and message for each answer, TLS included."""

from __future__ import annotations

import asyncio
import socket
import subprocess
from pathlib import Path

import pytest
from grpc_health.v1 import health_pb2

from cellstream.service.cli import main

pytestmark = pytest.mark.timeout(90)
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def health(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """Exit status, stdout and stderr of `cellstream health ARGV`; in a thread, since the command's
    blocking call must not hold the event loop the server under test runs on."""
    status = await asyncio.to_thread(main, ["health", *argv])
    out, err = capsys.readouterr()
    return status, out, err


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A self-signed server certificate (cert.pem, key.pem) naming only `cellstream`, as a
    Kubernetes Service's certificate would, not the 127.0.0.1 a probe dials."""
    directory = tmp_path_factory.mktemp("tls")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                    "-keyout", "key.pem", "-out", "cert.pem", "-days", "1", "-subj", "/CN=cellstream",
                    "-addext", "subjectAltName=DNS:cellstream"],
                   cwd=directory, check=True, capture_output=True, timeout=60)
    return directory


async def test_serving_exits_0(server, capsys):
    status, out, err = await health(capsys, "--target", f"127.0.0.1:{server.port}")
    assert (status, err) == (0, "")
    assert out == f"cellstream health: 127.0.0.1:{server.port}: SERVING\n"
    status, out, _ = await health(capsys, "--target", f"127.0.0.1:{server.port}",
                                  "--service", "cellstream.v1.Inference")
    assert status == 0 and "SERVING" in out


async def test_not_serving_exits_1(server, capsys):
    await server.health.set("", NOT_SERVING)
    status, out, err = await health(capsys, "--target", f"127.0.0.1:{server.port}")
    assert (status, out) == (1, "")
    assert err == f"cellstream health: 127.0.0.1:{server.port}: NOT_SERVING\n"


async def test_unknown_service_exits_1(server, capsys):
    status, _, err = await health(capsys, "--target", f"127.0.0.1:{server.port}", "--service", "no.such.Service")
    assert status == 1
    assert "does not know this service" in err and "no.such.Service" in err


async def test_no_server_exits_3_and_says_why(capsys):
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        status, out, err = await health(capsys, "--target", f"127.0.0.1:{port}", "--timeout", "2")
    assert (status, out) == (3, "")
    assert f"127.0.0.1:{port}: no answer: UNAVAILABLE" in err
    assert "Traceback" not in err


async def test_the_default_target_follows_cellstream_port(server, capsys, monkeypatch):
    monkeypatch.setenv("CELLSTREAM_PORT", str(server.port))
    status, out, _ = await health(capsys)
    assert status == 0 and f"127.0.0.1:{server.port}: SERVING" in out


async def test_tls_with_the_ca_and_the_certificate_s_name(start, certificate, capsys):
    running = await start(tls_cert_path=certificate / "cert.pem", tls_key_path=certificate / "key.pem")
    target = ["--target", f"127.0.0.1:{running.port}", "--timeout", "5"]
    status, out, _ = await health(capsys, *target, "--ca", str(certificate / "cert.pem"), "--server-name", "cellstream")
    assert status == 0 and "SERVING" in out
    # Without the name the certificate carries, the handshake fails: no answer, not "not serving".
    status, _, err = await health(capsys, *target, "--ca", str(certificate / "cert.pem"))
    assert status == 3 and "UNAVAILABLE" in err
    status, _, err = await health(capsys, *target)
    assert status == 3 and "UNAVAILABLE" in err


async def test_unusable_flags_exit_2(capsys, tmp_path):
    status, _, err = await health(capsys, "--cert", "client.pem")
    assert status == 2 and "--cert and --key go together" in err
    status, _, err = await health(capsys, "--ca", str(tmp_path / "missing.pem"))
    assert status == 2 and "missing.pem" in err
