"""An empty gRPC server, for the floor figure: what gRPC in Python costs on this machine before any work.

It sends back the bytes it receives, on a unary and on a bidirectional-streaming method, on the same
event loop as `cellstream serve` (uvloop), and reports SERVING over gRPC health so the harness starts,
times and observes it like the real server: `python -m cellstream.bench.echo --port PORT`.

For tritonclient, it also answers KServe's ModelInfer and ModelStreamInfer, without reading the request,
with one fixed reply as large as a 1-token step's: `--outputs N` FP32 values of output `--output` (the
model's logits). So the KServe rows have a floor driven by the same client as they are.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from collections.abc import AsyncIterator, Sequence

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from cellstream.service._proto.inference import grpc_service_pb2 as kserve_pb
from cellstream.service.config import Settings
from cellstream.service.server import grpc_options, run_event_loop

UNARY = "/cellstream.bench.Echo/Unary"
STREAM = "/cellstream.bench.Echo/Stream"
MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"
MODEL_STREAM_INFER = "/inference.GRPCInferenceService/ModelStreamInfer"
FLOAT_BYTES = 4


async def _unary(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    return request


async def _stream(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
    async for request in requests:
        yield request


def inference_reply(output: str, outputs: int) -> kserve_pb.ModelInferResponse:
    """What the server answers a 1-token step that asks for `output` (`outputs` values wide)."""
    tensor = kserve_pb.ModelInferResponse.InferOutputTensor(name=output, datatype="FP32", shape=[1, 1, outputs])
    return kserve_pb.ModelInferResponse(outputs=[tensor], raw_output_contents=[bytes(FLOAT_BYTES * outputs)])


class _Echo(grpc.GenericRpcHandler):
    def __init__(self, reply: kserve_pb.ModelInferResponse) -> None:
        unary_reply = reply.SerializeToString()
        stream_reply = kserve_pb.ModelStreamInferResponse(infer_response=reply).SerializeToString()

        async def model_infer(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            return unary_reply

        async def model_stream_infer(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
                                     ) -> AsyncIterator[bytes]:
            async for _ in requests:
                yield stream_reply

        self._handlers = {
            UNARY: grpc.unary_unary_rpc_method_handler(_unary),
            STREAM: grpc.stream_stream_rpc_method_handler(_stream),
            MODEL_INFER: grpc.unary_unary_rpc_method_handler(model_infer),
            MODEL_STREAM_INFER: grpc.stream_stream_rpc_method_handler(model_stream_infer),
        }

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        return self._handlers.get(handler_call_details.method)


async def serve(host: str, port: int, reply: kserve_pb.ModelInferResponse) -> None:
    server = grpc.aio.server(options=grpc_options(Settings()))  # cellstream's defaults: compared alike
    server.add_generic_rpc_handlers((_Echo(reply),))
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
    parser = argparse.ArgumentParser(prog="python -m cellstream.bench.echo", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--output", default="logits", help="name of the output tensor of the KServe reply")
    parser.add_argument("--outputs", type=int, default=1, help="FP32 values of that output")
    args = parser.parse_args(argv)
    run_event_loop(serve(args.host, args.port, inference_reply(args.output, args.outputs)))


if __name__ == "__main__":
    main()
