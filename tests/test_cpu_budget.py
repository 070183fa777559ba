"""The CPU budget (cgroup quota and affinity, whichever is smaller) on fake cgroup trees, the
extractor's pools sized from it (the budget and sizes in its log and metrics, each flag winning),
and model workers that run batches in parallel with the same vectors as one."""

import os
import subprocess
import sys
import threading
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from convsearch.cpu_budget import budget_from, cgroup_quota, cpu_budget
from convsearch.extractor.v1 import extractor_pb2 as pb
from convsearch.extractor.v1 import extractor_pb2_grpc
from convsearch.processes import start_service, stop_service
from convsearch.tensors import from_tensor
from convsearch_extractor.batcher import DynamicBatcher
from convsearch_extractor.config import ExtractorConfig
from convsearch_extractor.server import SERVICE_NAME
from convsearch_extractor.sizing import pool_sizes
from tests.conftest import jpeg_bytes, serve_extractor

EXTRACTOR = os.path.join(os.path.dirname(sys.executable), "convsearch-extractor")
CPU = torch.device("cpu")


def write(root, relative: str, text: str) -> None:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")


def budget(root, proc_cgroup: str, affinity: int):
    (root / "proc_self_cgroup").write_text(proc_cgroup)
    return cpu_budget(root, root / "proc_self_cgroup", set(range(affinity)))


@pytest.mark.parametrize(("cpu_max", "affinity", "cpus", "quota"), [
    ("max 100000", 8, 8, None),        # no quota: the affinity mask
    ("150000 100000", 8, 1, 1.5),      # rounded down
    ("250000 100000", 8, 2, 2.5),
    ("50000 100000", 8, 1, 0.5),       # never below 1
    ("400000 100000", 2, 2, 4.0),      # the affinity mask smaller than the quota
])
def test_cgroup_v2_quota_and_affinity(tmp_path, cpu_max, affinity, cpus, quota):
    write(tmp_path, "cpu.max", cpu_max)
    found = budget(tmp_path, "0::/\n", affinity)
    assert (found.cpus, found.affinity, found.quota) == (cpus, affinity, quota)


def test_cgroup_v2_nested_path_takes_the_smallest_quota_of_its_ancestors(tmp_path):
    write(tmp_path, "kubepods/pod1/cpu.max", "300000 100000")
    write(tmp_path, "kubepods/pod1/container/cpu.max", "max 100000")
    assert budget(tmp_path, "0::/kubepods/pod1/container\n", 64).cpus == 3
    write(tmp_path, "kubepods/pod1/container/cpu.max", "200000 100000")
    assert budget(tmp_path, "0::/kubepods/pod1/container\n", 64).cpus == 2


def test_a_cgroup_path_absent_under_the_mount_falls_back_to_its_root(tmp_path):
    # A container that mounts its own cgroup as the root still names the host's path.
    write(tmp_path, "cpu.max", "200000 100000")
    assert budget(tmp_path, "0::/kubepods/burstable/pod9/abc\n", 64).cpus == 2


def test_cgroup_v1_quota(tmp_path):
    proc = "12:pids:/\n4:cpu,cpuacct:/docker/abc\n1:name=systemd:/docker/abc\n0::/\n"
    write(tmp_path, "cpu,cpuacct/docker/abc/cpu.cfs_quota_us", "-1")
    write(tmp_path, "cpu,cpuacct/docker/abc/cpu.cfs_period_us", "100000")
    assert budget(tmp_path, proc, 16).quota is None
    assert budget(tmp_path, proc, 16).cpus == 16
    write(tmp_path, "cpu,cpuacct/docker/abc/cpu.cfs_quota_us", "350000")
    assert (budget(tmp_path, proc, 16).cpus, budget(tmp_path, proc, 16).quota) == (3, 3.5)
    assert budget(tmp_path, proc, 2).cpus == 2


def test_no_cgroup_files_and_odd_contents_mean_no_quota(tmp_path):
    assert cgroup_quota(tmp_path, "0::/\n") is None
    assert cgroup_quota(tmp_path, "") is None
    write(tmp_path, "cpu.max", "garbage")
    assert cgroup_quota(tmp_path, "0::/\n") is None
    assert budget_from(0, None).cpus == 1
    assert "no cgroup quota" in budget_from(4, None).describe()


def test_this_process_budget_is_within_its_affinity():
    found = cpu_budget()
    assert 1 <= found.cpus <= len(os.sched_getaffinity(0))


def test_pools_are_sized_from_the_budget_and_flags_win():
    auto = pool_sizes(ExtractorConfig(device="cpu"), budget_from(4, 2.0), CPU)
    assert (auto.model_workers, auto.torch_threads, auto.interop_threads, auto.decode_workers,
            auto.decode_processes, auto.rpc_workers, auto.max_batch) == (2, 1, 1, 2, 0, 16 * 3, 16)
    set_by_flags = pool_sizes(ExtractorConfig(device="cpu", cpu_workers=3, torch_threads=2, interop_threads=2,
                                              decode_workers=5, decode_processes=1, rpc_workers=7, max_batch=12),
                              budget_from(4, 2.0), CPU)
    assert (set_by_flags.model_workers, set_by_flags.torch_threads, set_by_flags.interop_threads,
            set_by_flags.decode_workers, set_by_flags.decode_processes, set_by_flags.rpc_workers,
            set_by_flags.max_batch) == (3, 2, 2, 5, 1, 7, 12)
    one_worker = pool_sizes(ExtractorConfig(device="cpu", cpu_workers=1), budget_from(8, 4.0), CPU)
    assert (one_worker.model_workers, one_worker.torch_threads) == (1, 4)
    on_cuda = pool_sizes(ExtractorConfig(), budget_from(64, 8.0), torch.device("cuda"))
    assert (on_cuda.model_workers, on_cuda.decode_processes, on_cuda.rpc_workers, on_cuda.max_batch) == (2, 8, 192, 64)


def test_negative_sizes_are_refused_at_start():
    result = subprocess.run([EXTRACTOR, "--cpu-workers", "-1"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "cpu_workers must be 0 (sized from the CPU budget) or more" in result.stderr


def test_an_extractor_pinned_to_one_cpu_sizes_every_pool_to_it():
    pinned = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(pinned)})  # this thread only; the extractor inherits it
    try:
        process, _ = start_service("convsearch-extractor", "--metrics-port", "-1", service=SERVICE_NAME)
    finally:
        os.sched_setaffinity(0, pinned)
    log = stop_service(process)
    assert "CPU budget 1 (affinity 1 CPUs" in log, log
    assert ("1 model workers (max batch 8), 1 torch intra-op threads, 1 inter-op, 1 decode threads, "
            "16 RPC threads") in log, log


def metric_samples(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line.startswith("convsearch_extractor_cpu_budget") or line.startswith("convsearch_extractor_pool_size")}


def test_the_budget_and_pool_sizes_are_metrics_and_flags_override_them():
    service, channel, _ = serve_extractor(decode_workers=3, rpc_workers=9)
    try:
        samples = metric_samples(service.metrics_port)
    finally:
        channel.close()
        service.stop(1.0)
    cpus = cpu_budget().cpus
    assert samples["convsearch_extractor_cpu_budget"] == cpus
    assert samples['convsearch_extractor_pool_size{pool="model_workers"}'] == cpus
    assert samples['convsearch_extractor_pool_size{pool="torch_threads"}'] == 1
    assert samples['convsearch_extractor_pool_size{pool="decode_workers"}'] == 3
    assert samples['convsearch_extractor_pool_size{pool="rpc_workers"}'] == 9


def test_two_model_workers_run_batches_at_once():
    both_running = threading.Barrier(2, timeout=30)

    def run_batch(key, pixels):
        both_running.wait()  # passes only when two batches run at the same time
        return {"out": pixels.reshape(len(pixels), -1)[:, :1].astype(np.float32)}

    batcher = DynamicBatcher(run_batch, max_batch=4, max_delay_s=0.0, workers=2)
    try:
        first = batcher.submit("a", np.full((2, 1, 1, 3), 1, np.uint8))
        second = batcher.submit("b", np.full((2, 1, 1, 3), 2, np.uint8))
        assert first.result(timeout=30)["out"].ravel().tolist() == [1, 1]
        assert second.result(timeout=30)["out"].ravel().tolist() == [2, 2]
    finally:
        batcher.close()


def test_with_several_workers_one_large_request_spreads_over_them():
    sizes = []
    batcher = DynamicBatcher(lambda key, pixels: sizes.append(len(pixels)) or {"out": pixels[:, 0, 0, :1]},
                             max_batch=8, max_delay_s=0.0, workers=2)
    try:
        result = batcher.submit("a", np.arange(8, dtype=np.uint8).reshape(8, 1, 1, 1).repeat(3, axis=3))
        assert result.result(timeout=30)["out"].ravel().tolist() == list(range(8))
    finally:
        batcher.close()
    assert sorted(sizes) == [4, 4]


def embed_concurrently(stub, images: list[bytes]) -> list[np.ndarray]:
    config = pb.EmbedConfig(layers=["_conv_head", "_blocks.9._expand_conv"])
    request = lambda image: pb.EmbedRequest(config=config, images=[image])  # noqa: E731
    with ThreadPoolExecutor(8) as clients:
        replies = list(clients.map(lambda image: stub.Embed(request(image), timeout=120), images))
    return [np.concatenate([from_tensor(layer.vectors).ravel() for layer in reply.layers]) for reply in replies]


def test_two_model_workers_give_the_vectors_one_gives():
    rng = np.random.default_rng(7)
    images = [jpeg_bytes(rng.integers(0, 256, (96 + 8 * i, 128, 3), np.uint8)) for i in range(12)]
    vectors = {}
    for workers in (1, 2):
        service, channel, _ = serve_extractor(cpu_workers=workers, torch_threads=1)
        try:
            vectors[workers] = embed_concurrently(extractor_pb2_grpc.ExtractorServiceStub(channel), images)
        finally:
            channel.close()
            service.stop(1.0)
    for one, two in zip(vectors[1], vectors[2], strict=True):
        np.testing.assert_allclose(two, one, rtol=0, atol=1e-6)
