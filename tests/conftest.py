"""Shared fixtures: an in-process extractor on a free port, sample images, a labeled sample."""

import io
import types

import numpy as np
import pytest
from PIL import Image
from skimage import data as skdata

from convsearch.channels import create_channel, wait_until_serving
from convsearch.datasets import fashion_mnist_sample
from convsearch.extractor.v1 import extractor_pb2_grpc
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


def start_extractor(**overrides):
    settings = dict(host="127.0.0.1", port=0, metrics_port=0, allow_random_weights=True,
                    device="cpu", memory_budget_mb=2048)
    settings.update(overrides)
    service, port = build_server(ExtractorConfig(**settings))
    service.start()
    channel = create_channel(f"127.0.0.1:{port}")
    wait_until_serving(channel, SERVICE_NAME, timeout_s=120)
    return service, channel


@pytest.fixture(scope="session")
def extractor():
    """An in-process extractor (`.service`, `.channel`, `.stub`) that allows random weights."""
    service, channel = start_extractor()
    yield types.SimpleNamespace(service=service, channel=channel,
                                stub=extractor_pb2_grpc.ExtractorServiceStub(channel))
    channel.close()
    service.stop(1.0)


def start_index(data_dir, **overrides):
    from convsearch_index.config import IndexConfig
    from convsearch_index.server import SERVICE_NAME as INDEX_SERVICE
    from convsearch_index.server import build_server as build_index

    settings = dict(host="127.0.0.1", port=0, data_dir=str(data_dir), checkpoint_interval_s=3600.0)
    settings.update(overrides)
    service, port = build_index(IndexConfig(**settings))
    service.start()
    channel = create_channel(f"127.0.0.1:{port}")
    wait_until_serving(channel, INDEX_SERVICE, timeout_s=30)
    return service, channel
