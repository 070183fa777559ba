"""Shared fixtures: in-process services on free ports, sample images, a labeled sample."""

import contextlib
import io
import socket
import types

import numpy as np
import pytest
from PIL import Image
from skimage import data as skdata

from convsearch.channels import create_channel
from convsearch.datasets import fashion_mnist_sample
from convsearch.extractor.v1 import extractor_pb2_grpc
from convsearch.health import wait_until_serving
from convsearch_extractor.config import ExtractorConfig
from convsearch_extractor.server import SERVICE_NAME, build_server


def jpeg_bytes(pixels: np.ndarray, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


@pytest.fixture(scope="session")
def chelsea_jpeg() -> bytes:
    return jpeg_bytes(skdata.chelsea())


@pytest.fixture(scope="session")
def coffee_jpeg() -> bytes:
    return jpeg_bytes(skdata.coffee())


@pytest.fixture(scope="session")
def fashion500():
    return fashion_mnist_sample(per_class=50)


def _serve(build, config, service_name: str, timeout_s: float):
    """Builds and starts a service on a free port; (service, channel, address) once it is SERVING."""
    service, port = build(config)
    service.start()
    address = f"127.0.0.1:{port}"
    channel = create_channel(address)
    wait_until_serving(channel, service_name, timeout_s=timeout_s)
    return service, channel, address


def serve_extractor(**overrides):
    """An in-process extractor (random weights allowed, CPU unless overridden): (service, channel, address)."""
    settings = dict(host="127.0.0.1", port=0, metrics_port=0, allow_random_weights=True,
                    device="cpu", memory_budget_mb=2048)
    settings.update(overrides)
    return _serve(build_server, ExtractorConfig(**settings), SERVICE_NAME, 120)


def start_extractor(**overrides):
    return serve_extractor(**overrides)[:2]


@pytest.fixture(scope="session")
def extractor():
    """An in-process extractor (`.service`, `.channel`, `.stub`) that allows random weights."""
    service, channel = start_extractor()
    yield types.SimpleNamespace(service=service, channel=channel,
                                stub=extractor_pb2_grpc.ExtractorServiceStub(channel))
    channel.close()
    service.stop(1.0)


def serve_index(data_dir, **overrides):
    """An in-process index keeping its data in data_dir: (service, channel, address)."""
    from convsearch_index.config import IndexConfig
    from convsearch_index.server import SERVICE_NAME as INDEX_SERVICE
    from convsearch_index.server import build_server as build_index

    settings = dict(host="127.0.0.1", port=0, metrics_port=0, data_dir=str(data_dir), checkpoint_interval_s=3600.0)
    settings.update(overrides)
    return _serve(build_index, IndexConfig(**settings), INDEX_SERVICE, 30)


def start_index(data_dir, **overrides):
    return serve_index(data_dir, **overrides)[:2]


def serve_gateway(extractor: str, index: str, **overrides):
    """An in-process gateway over the extractor and index at these addresses: (service, channel, address)."""
    from convsearch_gateway.config import GatewayConfig
    from convsearch_gateway.server import SERVICE_NAME as GATEWAY_SERVICE
    from convsearch_gateway.server import build_server as build_gateway

    settings = dict(host="127.0.0.1", port=0, metrics_port=0, extractor=extractor, index=index,
                    health_interval_s=0.2)
    settings.update(overrides)
    return _serve(build_gateway, GatewayConfig(**settings), GATEWAY_SERVICE, 30)


@contextlib.contextmanager
def running_backends(data_dir, **extractor_overrides):
    """An in-process extractor (with these settings) and an index keeping its data in data_dir,
    for a module's gateways: (extractor address, index address)."""
    extractor, extractor_channel, extractor_address = serve_extractor(**extractor_overrides)
    index, index_channel, index_address = serve_index(data_dir)
    try:
        yield extractor_address, index_address
    finally:
        for running, channel in ((index, index_channel), (extractor, extractor_channel)):
            channel.close()
            running.stop(1.0)


@contextlib.contextmanager
def running_gateway(extractor: str, index: str, **overrides):
    """An in-process gateway over these backends: (service, channel, address)."""
    service, channel, address = serve_gateway(extractor, index, **overrides)
    try:
        yield service, channel, address
    finally:
        channel.close()
        service.stop(0.5)


def damage_collection(service, dataset: str, name: str) -> None:
    """Leaves a collection of an in-process index `service` damaged, as files failing their checks
    at run time would: it answers DATA_LOSS and takes no writes."""
    info = service.index.collection(dataset, name)
    info.vectors.close(checkpoint=False)
    info.vectors, info.damage = None, f"collection {name} of dataset {dataset} is damaged"


@pytest.fixture
def busy_port():
    """A port a socket on 127.0.0.1 listens on for the test's length."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]
