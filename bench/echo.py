"""An empty gRPC server, for the floor figure: what gRPC in Python costs on this machine before any work.

It sends back the bytes it receives, on a unary and on a bidirectional-streaming method, on the same
event loop as `cellstream serve` (uvloop), and reports SERVING over gRPC health so the harness starts,
times and observes it like the real server: `python -m bench.echo --port PORT`.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from collections.abc import AsyncIterator, Sequence

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from service.cli import run_event_loop
from service.config import Settings
from service.server import grpc_options

UNARY = "/cellstream.bench.Echo/Unary"
STREAM = "/cellstream.bench.Echo/Stream"


async def _unary(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    return request


async def _stream(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
    async for request in requests:
        yield request


class _Echo(grpc.GenericRpcHandler):
    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        if handler_call_details.method == UNARY:
            return grpc.unary_unary_rpc_method_handler(_unary)
        if handler_call_details.method == STREAM:
            return grpc.stream_stream_rpc_method_handler(_stream)
        return None


async def serve(host: str, port: int) -> None:
    server = grpc.aio.server(options=grpc_options(Settings()))  # cellstream's defaults: compared alike
    server.add_generic_rpc_handlers((_Echo(),))
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if server.add_insecure_port(f"{host}:{port}") == 0:
        raise OSError(f"cannot bind {host}:{port}")
    await server.start()
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(0)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.echo", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    run_event_loop(serve(args.host, args.port))


if __name__ == "__main__":
    main()
