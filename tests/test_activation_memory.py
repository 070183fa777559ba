"""A forward pass holds the whole output of every layer asked for until it ends: every layer of
efficientnet_lite0 holds 76 MB an image, 600 MB for a CPU batch of 8 (efficientnet_b5's 4.7 GB),
so one request could take an extractor's memory. Batches that would hold more than
--max-activation-mb run in parts, with the same vectors."""

import json
import pathlib
import subprocess
import sys
import tempfile
import textwrap

import numpy as np
import pytest
import torch

from convsearch.channels import MIB
from convsearch_extractor.catalog import load_catalog
from convsearch_extractor.config import DEFAULT_CPU_ACTIVATION_MB, ExtractorConfig
from convsearch_extractor.runtime import EmbedSpec, ModelPool

MODEL = "efficientnet_lite0"

# Embeds 8 random images at every layer of MODEL with random weights, the model loaded as the
# service loads it (ModelPool), within `budget` bytes of outputs (0: no bound); prints the
# growth of the process's peak memory over the embedding.
_PEAK = textwrap.dedent("""
    import json, pathlib, re, sys, tempfile
    import numpy as np, torch
    from convsearch_extractor.catalog import load_catalog
    from convsearch_extractor.runtime import EmbedSpec, ModelPool

    def peak_mib():
        return int(re.search(r"VmHWM:\\s+(\\d+)", pathlib.Path("/proc/self/status").read_text())[1]) / 1024

    torch.set_num_threads(1)
    pool = ModelPool(load_catalog(pathlib.Path(tempfile.mkdtemp())), torch.device("cpu"), 1 << 30, True,
                     max_activation_bytes=int(sys.argv[2]))
    model = pool.acquire(sys.argv[1])
    layers = tuple(layer.name for layer in pool.graph(sys.argv[1]).layers.values() if layer.is_tensor)
    pixels = np.random.default_rng(0).integers(0, 256, (8, 224, 224, 3), dtype=np.uint8)
    model.embed(pixels[:1], EmbedSpec(sys.argv[1], layers[:1]))  # traced and warmed: not counted
    before = peak_mib()
    model.embed(pixels, EmbedSpec(sys.argv[1], layers))
    print(json.dumps({"layers": len(layers), "growth_mib": peak_mib() - before}))
""")


def _peak_growth(budget_bytes: int) -> dict:
    out = subprocess.run([sys.executable, "-c", _PEAK, MODEL, str(budget_bytes)], capture_output=True, text=True,
                         timeout=300, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_every_layer_of_a_batch_runs_within_the_activation_bound():
    unbounded, bounded = _peak_growth(0), _peak_growth(100 * MIB)
    assert unbounded["layers"] > 100
    assert unbounded["growth_mib"] > 450, unbounded  # 8 x 76 MB held at once
    assert bounded["growth_mib"] < unbounded["growth_mib"] / 2, (bounded, unbounded)


def test_a_batch_run_in_parts_gives_the_vectors_of_one_pass():
    torch.manual_seed(0)
    pool = ModelPool(load_catalog(pathlib.Path(tempfile.mkdtemp())), torch.device("cpu"), 1 << 30, True)
    model = pool.acquire(MODEL)
    graph = pool.graph(MODEL)
    layers = tuple(graph.featured)
    pixels = np.random.default_rng(1).integers(0, 256, (5, 224, 224, 3), dtype=np.uint8)
    whole = model.embed(pixels, EmbedSpec(MODEL, layers, "max"))
    per_image = 4 * sum(int(np.prod(graph.layers[layer].output_shape)) for layer in layers)
    model.max_activation_bytes = 2 * per_image  # two images a pass: parts of 2, 2 and 1
    assert model.images_per_pass(layers) == 2
    parts = model.embed(pixels, EmbedSpec(MODEL, layers, "max"))
    for layer in layers:
        np.testing.assert_allclose(parts[layer], whole[layer], rtol=1e-5, atol=1e-6)
    model.max_activation_bytes = per_image // 3  # not even one image fits: one a pass
    assert model.images_per_pass(layers) == 1
    model.pad_batches = True  # CUDA's padded batches: a power of two a pass
    model.max_activation_bytes = 3 * per_image
    assert model.images_per_pass(layers) == 2


@pytest.mark.parametrize(("flag", "expected"), [(0, DEFAULT_CPU_ACTIVATION_MB * MIB), (64, 64 * MIB)])
def test_the_bound_defaults_to_a_gigabyte_on_cpu(flag, expected):
    config = ExtractorConfig(device="cpu", max_activation_mb=flag)
    config.validate()
    assert config.max_activation_bytes() == expected
    with pytest.raises(ValueError, match="max_activation_mb"):
        ExtractorConfig(device="cpu", max_activation_mb=-1).validate()
