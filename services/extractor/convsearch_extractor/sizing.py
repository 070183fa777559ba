"""Every pool of the extractor sized from the CPU the process may really use
(convsearch.cpu_budget: the cgroup quota and the affinity mask, whichever is smaller), not from
the host's core count: on a 2-CPU pod of a 64-core node, or beside other busy processes,
oversubscribed OpenMP threads collapse.

Model workers on CPU are threads, each running whole batches from the dynamic batcher with one
intra-op thread, the way TorchServe runs one single-threaded worker per core: a batch on one
thread keeps one core busy from start to end, while one batch split over several threads waits
at every operator's barrier for the slowest thread (a thread that another process preempted
holds all the others back). Threads rather than processes: torch releases the GIL in its
operators, so N threads run N forward passes at once: on the 2 shared CPUs of the build machine,
batches of 8, two threads embedded 37-43 images/s and two processes 35-42, at the same images per
CPU-second (29-34 against 30-33: the GIL costs nothing measurable). Threads share one copy of
each model, its memory budget, its traced feature extractors and the weights' fingerprints, with
no pixels or vectors to copy between processes. torch's intra-op thread count is process-wide,
so it is the budget divided among the workers.

Each size can still be set by its flag; 0 (-1 for --decode-processes and --max-batch) means sized
here.
"""

import dataclasses
import logging

import torch

from convsearch.cpu_budget import CpuBudget
from convsearch_extractor.config import ExtractorConfig

log = logging.getLogger("convsearch.extractor.sizing")
# More decoders than this only contend for the GIL and the memory bus.
MAX_DECODERS = 16
# Batches a GPU likes; on one CPU thread, batches of 4 to 8 images ran about 1.5x as many images
# per second as batches of 16 or 32 (efficientnet_lite0: the activations of large batches leave
# the caches).
CUDA_BATCH = 32  # a worker's batch on CUDA until warm-up chooses one (see Extractor.warm_up)
CUDA_WORKERS = 2  # each on a CUDA stream of its own: one's copies and host work overlap the other's kernels
CPU_BATCH_PER_WORKER = 8


@dataclasses.dataclass(frozen=True)
class PoolSizes:
    """The extractor's pools: model workers (threads taking batches), torch's intra-op and
    inter-op threads, decoding threads or processes, and RPC threads."""

    budget: CpuBudget
    max_batch: int
    model_workers: int
    torch_threads: int
    interop_threads: int
    decode_workers: int
    decode_processes: int
    rpc_workers: int

    def describe(self) -> str:
        decoding = (f"{self.decode_processes} decode processes" if self.decode_processes
                    else f"{self.decode_workers} decode threads")
        return (f"CPU budget {self.budget.describe()}: {self.model_workers} model workers (max batch "
                f"{self.max_batch}), "
                f"{self.torch_threads} torch intra-op threads, {self.interop_threads} inter-op, "
                f"{decoding}, {self.rpc_workers} RPC threads")

    def gauges(self) -> dict[str, int]:
        """Each pool's size by name, for the metrics."""
        return {"model_workers": self.model_workers, "torch_threads": self.torch_threads,
                "interop_threads": self.interop_threads, "decode_workers": self.decode_workers,
                "decode_processes": self.decode_processes, "rpc_workers": self.rpc_workers}


def pool_sizes(config: ExtractorConfig, budget: CpuBudget, device: torch.device) -> PoolSizes:
    """The pool sizes for `config` on `device` within `budget`; an explicit flag wins.

    On CUDA two workers feed the GPU (see CUDA_WORKERS) and decoding what the GPU does not (see
    convsearch_extractor.device_decode) is the bottleneck, so decoding gets the budget in
    processes. On CPU the batches stay small (see CPU_BATCH_PER_WORKER). RPC threads mostly
    wait on the batcher, holding the GIL only to parse and build messages, so they are sized
    from the requests it takes to fill a batch for every worker and one more being gathered, not
    from the CPUs.
    """
    cpus = budget.cpus
    on_cuda = device.type == "cuda"
    workers = CUDA_WORKERS if on_cuda else config.cpu_workers or cpus
    max_batch = config.max_batch
    if max_batch < 0:
        max_batch = (CUDA_BATCH if on_cuda else CPU_BATCH_PER_WORKER) * workers
    decode_processes = config.decode_processes
    if decode_processes < 0:
        decode_processes = min(MAX_DECODERS, cpus) if on_cuda else 0
    return PoolSizes(
        budget=budget, max_batch=max_batch, model_workers=workers,
        torch_threads=config.torch_threads or max(1, cpus // workers),
        interop_threads=config.interop_threads or 1,
        decode_workers=config.decode_workers or min(MAX_DECODERS, cpus),
        decode_processes=decode_processes,
        rpc_workers=config.rpc_workers or max_batch * (workers + 1))


def apply_torch_threads(sizes: PoolSizes) -> None:
    """Sets torch's intra-op and inter-op threads. The inter-op count can be set once per process,
    before any inter-op work: a second extractor in the same process (tests) keeps the first's."""
    torch.set_num_threads(sizes.torch_threads)
    if torch.get_num_interop_threads() != sizes.interop_threads:
        try:
            torch.set_num_interop_threads(sizes.interop_threads)
        except RuntimeError:
            log.warning("torch inter-op threads already fixed at %d in this process; %d asked for",
                        torch.get_num_interop_threads(), sizes.interop_threads)
