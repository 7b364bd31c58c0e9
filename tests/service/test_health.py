"""H. Health checking and server reflection on the gRPC port."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture
async def channel(server):
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        yield ch


async def test_health_serving(channel):
    stub = health_pb2_grpc.HealthStub(channel)
    for name in ("", "cellstream.v1.Inference", "inference.GRPCInferenceService"):
        response = await stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=10)
        assert response.status == SERVING, name
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=10)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


async def test_reflection_lists_services(channel):
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    requests = [
        reflection_pb2.ServerReflectionRequest(list_services=""),
        reflection_pb2.ServerReflectionRequest(file_containing_symbol="cellstream.v1.Inference"),
        reflection_pb2.ServerReflectionRequest(file_containing_symbol="inference.GRPCInferenceService"),
        reflection_pb2.ServerReflectionRequest(file_containing_symbol="grpc.health.v1.Health"),
    ]
    call = stub.ServerReflectionInfo(requests, timeout=10)
    responses = await asyncio.wait_for(_all(call), 10)
    names = {service.name for service in responses[0].list_services_response.service}
    assert {"cellstream.v1.Inference", "inference.GRPCInferenceService", "grpc.health.v1.Health"} <= names
    assert "grpc.reflection.v1alpha.ServerReflection" in names
    for response in responses[1:]:
        assert response.file_descriptor_response.file_descriptor_proto, f"no descriptor: {response}"


async def _all(call) -> list:
    return [response async for response in call]


async def test_stop_flips_health_to_not_serving_first(server, channel):
    stub = health_pb2_grpc.HealthStub(channel)
    watch = stub.Watch(health_pb2.HealthCheckRequest(service="cellstream.v1.Inference"), timeout=30)
    assert (await asyncio.wait_for(watch.read(), 10)).status == SERVING
    stopping = asyncio.create_task(server.stop(5))
    # The watcher, an in-flight call, sees NOT_SERVING before the server goes away.
    assert (await asyncio.wait_for(watch.read(), 10)).status == NOT_SERVING
    watch.cancel()
    await asyncio.wait_for(stopping, 10)
