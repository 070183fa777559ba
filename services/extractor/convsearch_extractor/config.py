"""The extractor's configuration, from flags and CONVSEARCH_EXTRACTOR_* environment variables."""

import dataclasses
import pathlib

import torch

from convsearch import stream_cap
from convsearch.allowed_clients import ClientNamesOption
from convsearch.channels import MIB
from convsearch.config import check_port, check_positive, option, parse_config
from convsearch.image_limits import DEFAULT_MAX_PIXELS
from convsearch.logs import LOG_FORMATS, check_log_format
from convsearch.serving import ConnectionAgeOptions
from convsearch.tls import ServerTLSOptions, check_server_options
from convsearch_extractor.catalog import DEFAULT_MODEL
from convsearch_extractor.device_decode import DECODE_DEVICES
from convsearch_extractor.host_decode import ARENA_MB, MIN_ARENA_MB

DEFAULT_CPU_ACTIVATION_MB = 1024  # max_activation_mb's default on CPU


@dataclasses.dataclass(frozen=True)
class ExtractorConfig(ServerTLSOptions, ClientNamesOption, ConnectionAgeOptions):
    """Everything the extractor process can be told."""

    host: str = option("0.0.0.0", "interface to listen on")
    port: int = option(50052, "gRPC port; 0 picks a free one")
    metrics_port: int = option(9052, "Prometheus /metrics port; 0 picks a free one, -1 disables")
    log_format: str = option("text", f"log lines as {' or '.join(LOG_FORMATS)} (JSON: one object a line)")
    device: str = option("auto", "auto (CUDA when present), cpu, cuda or cuda:N")
    default_model: str = option(DEFAULT_MODEL, "model used when a request names none; loaded at start")
    max_batch: int = option(-1, "most images the model workers take at once (one forward pass on one "
                                "worker; divided among them when there are several); -1: on CUDA chosen "
                                "at warm-up for the default model (the smallest of 32 to 256 a worker "
                                "within 5% of the fastest), 8 per model worker on CPU, where larger "
                                "batches run slower")
    max_queue_delay_ms: float = option(5.0, "longest wait for more requests to fill a batch")
    max_images: int = option(256, "most images in one Embed request or stream message")
    max_pixels: int = option(DEFAULT_MAX_PIXELS, "largest image accepted, in pixels (decompression bombs); "
                                                      "the gateway's --max-pixels should match")
    max_flatten: int = option(100_000, "most values a flattened layer may give per image")
    max_message_mb: int = option(64, "largest gRPC message received or sent, in MiB")
    memory_budget_mb: int = option(4096, "memory for loaded models; least recently used go first")
    max_activation_mb: int = option(0, "memory the requested layers' outputs of one forward pass may hold "
                                       "(each model worker's); a batch needing more runs in parts. 0: 1024 "
                                       "on CPU, an eighth of the GPU's memory on CUDA")
    weights_dir: str = option(str(pathlib.Path(torch.hub.get_dir())),
                              "torchvision weights are looked for in WEIGHTS_DIR/checkpoints/")
    allow_random_weights: bool = option(False, "build models without weights files with random "
                                               "weights (development and tests; responses say so)")
    cpu_workers: int = option(0, "model workers on CPU, each running batches from the dynamic batcher "
                                 "in parallel; 0: one per CPU of the budget (two on CUDA always, each on "
                                 "a CUDA stream of its own)")
    torch_threads: int = option(0, "torch intra-op threads (shared by the model workers); 0: the CPU "
                                   "budget divided among the model workers")
    interop_threads: int = option(0, "torch inter-op threads; 0: 1 (the model workers are the parallelism)")
    decode_workers: int = option(0, "threads decoding images; 0: one per CPU of the budget (up to 16)")
    decode_device: str = option("auto", "where JPEGs are decoded: auto (on the model's CUDA device, with "
                                        "nvJPEG, when torchvision can; else on the CPU), cpu, or cuda (the "
                                        "model's device; refused where it cannot). Other formats: the CPU")
    decode_processes: int = option(-1, "processes decoding images instead of threads; -1: one per "
                                       "CPU of the budget (up to 16) on CUDA, where decoding is the "
                                       "bottleneck, and threads on CPU")
    decode_arena_mb: int = option(ARENA_MB, "shared memory the decode processes write pixels into, in MiB (only with "
                                       "decode processes); a request waits while it is full")
    rpc_workers: int = option(0, "threads serving RPCs; 0: enough waiting requests to fill a batch for "
                                 "every model worker and one more (max batch x (workers + 1))")
    max_streams: int = option(0, stream_cap.HELP)
    compile: bool = option(False, "run models through torch.compile: faster forward passes, after a longer "
                                  "warm-up (logged, and exported as convsearch_extractor_warm_up_seconds); "
                                  "on CPU it needs a C++ compiler")
    grace_s: float = option(10.0, "seconds in-flight RPCs get to finish on SIGTERM")

    def validate(self) -> None:
        """Raises ValueError for values the service cannot run with."""
        if self.max_batch != -1:
            check_positive(self.max_batch, "max_batch")
        for name in ("max_images", "max_pixels", "max_flatten", "max_message_mb",
                     "memory_budget_mb"):
            check_positive(getattr(self, name), name)
        if self.decode_arena_mb < MIN_ARENA_MB:
            raise ValueError(f"decode_arena_mb must be at least {MIN_ARENA_MB}, got {self.decode_arena_mb}")
        for name in ("cpu_workers", "torch_threads", "interop_threads", "decode_workers", "rpc_workers",
                     "max_streams", "max_activation_mb"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be 0 (sized from the CPU budget) or more, got {getattr(self, name)}")
        check_port(self.port, "port")
        check_port(self.metrics_port, "metrics_port", disabled_ok=True)
        check_log_format(self.log_format)
        check_server_options(self.tls_cert, self.tls_key, self.tls_client_ca)
        self.check_client_names()
        self.check_connection_age()
        if self.decode_processes < -1:
            raise ValueError(f"decode_processes must be -1 (auto), 0 (threads) or more, got {self.decode_processes}")
        if self.max_queue_delay_ms < 0:
            raise ValueError(f"max_queue_delay_ms must be >= 0, got {self.max_queue_delay_ms}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"device {self.device!r}: use auto, cpu, cuda or cuda:N")
        if self.decode_device not in DECODE_DEVICES:
            raise ValueError(f"decode_device {self.decode_device!r}: use {', '.join(DECODE_DEVICES)}")
        if self.decode_device == "cuda" and self.torch_device().type != "cuda":
            raise ValueError("decode_device cuda needs the model on CUDA (--device cuda or auto with a GPU)")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"device {self.device!r} asked for, but CUDA is not available here")

    def max_activation_bytes(self) -> int:
        """max_activation_mb in bytes, its default chosen for the device."""
        if self.max_activation_mb:
            return self.max_activation_mb * MIB
        device = self.torch_device()
        if device.type == "cuda":
            return torch.cuda.get_device_properties(device).total_memory // 8
        return DEFAULT_CPU_ACTIVATION_MB * MIB

    def torch_device(self) -> torch.device:
        """The device models run on."""
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)


def load_config(argv=None) -> ExtractorConfig:
    """Parses flags and environment; exits with a usage message on a bad value."""
    return parse_config(ExtractorConfig, "convsearch-extractor", "CONVSEARCH_EXTRACTOR", argv,
                        "Embeds images with ImageNet-pretrained CNNs at any layer, over gRPC.")
