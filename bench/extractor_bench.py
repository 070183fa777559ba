"""Extractor throughput: images/s through the service over gRPC (JPEG in, vectors out) against
the same model, layer and batch size run in-process (on CUDA decoding on the GPU and the forward
pass, as the service does by default; on the CPU the forward pass of pre-decoded pixels), plus
many concurrent single-image clients.

The service's own overhead: the `pixels` model (whose forward pass costs almost nothing, like an
identity model in Triton) streamed through BulkEmbed at its four layers, as indexing does
(pipeline_img_s), against the same decoder run in-process on the same number of workers
(decode_img_s); pipeline_ratio = pipeline_img_s / decode_img_s. The same messages answered by a
bare gRPC server with ready-made answers measure what gRPC alone costs (transport_*): where the
CPUs are the limit, the pipeline reaches at most transport_bound_ratio = decode CPU / (decode CPU
+ the bare server's and its client's CPU) of the decoder's images/s.

Under contention, as on a busy machine or a pod beside noisy neighbours: with a process burning
one CPU (pinned there) beside them, two services side by side, one with its defaults (every pool
sized from the CPU budget) and one with its CPU pools forced to 1 (--cpu-workers,
--torch-threads, --interop-threads and --decode-workers 1; the RPC pool keeps its size, or
concurrent clients could not be batched), measured in alternating rounds: 32 concurrent
single-image clients (contended_img_s, forced1_contended_img_s) and the median latency of one
client's single-image requests (contended_p50_ms, forced1_contended_p50_ms);
contended_ratio = contended_img_s / forced1_contended_img_s.

Last stdout line: one JSON object (service_img_s, inprocess_img_s, ratio, concurrent_img_s,
pipeline_img_s, decode_img_s, pipeline_ratio, transport_bound_ratio, contended_img_s, contended_p50_ms,
forced1_contended_img_s, forced1_contended_p50_ms, contended_ratio, cpu_budget, ...).
"""

import argparse
import collections
import functools
import io
import json
import multiprocessing
import os
import pathlib
import subprocess
import sys
import tempfile
import threading
import time

import grpc
import numpy as np
import torch
from PIL import Image
from skimage import data as skdata

from convsearch.channels import create_channel
from convsearch.cpu_budget import cpu_budget
from convsearch.extractor.v1 import extractor_pb2 as pb
from convsearch.extractor.v1 import extractor_pb2_grpc
from convsearch.processes import start_service, stop_service
from convsearch.serving import bind, create_server
from convsearch.tensors import to_tensor
from convsearch_extractor import pixels
from convsearch_extractor.catalog import load_catalog
from convsearch_extractor.device_decode import device_decoder
from convsearch_extractor.host_decode import PixelDecoder
from convsearch_extractor.imaging import decode
from convsearch_extractor.runtime import EmbedSpec, LoadedModel
from convsearch_extractor.server import SERVICE_NAME
from convsearch_extractor.sizing import MAX_DECODERS

# The CPU pools forced to one thread each: the setting the defaults must hold up against.
FORCED_TO_ONE = ("--cpu-workers", "1", "--torch-threads", "1", "--interop-threads", "1", "--decode-workers", "1")


def photos(count: int) -> list[bytes]:
    """`count` 640x480 JPEG photos (skimage's sample photos, flipped for variety)."""
    sources = [skdata.chelsea(), skdata.coffee(), skdata.astronaut(), skdata.rocket()]
    out = []
    for i in range(count):
        image = Image.fromarray(sources[i % len(sources)]).resize((640, 480))
        if (i // len(sources)) % 2:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def inprocess_runner(model: str, layer: str, images: list[bytes], device: torch.device):
    """A function running the batch in this process, the ceiling: on the CPU one forward pass of
    the pre-decoded batch; with a device decoder (CUDA), decoding there and the forward pass."""
    spec = load_catalog(pathlib.Path(tempfile.mkdtemp()))[model]
    loaded = LoadedModel(spec, spec.build(True), True, device)
    embed = EmbedSpec(model, (layer,))
    decoder = device_decoder("auto", device)
    if decoder is not None:
        return lambda: loaded.embed(decoder.decode(images, spec.preprocess), embed)
    pixels = np.stack([decode(image, spec.preprocess, 10**8) for image in images])
    return lambda: loaded.embed(pixels, embed)


def process_cpu_s(pid: int) -> float:
    """CPU seconds process `pid` has used, all threads (Linux /proc); NaN where unreadable."""
    try:
        fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def tree_cpu_s(pid: int) -> float:
    """CPU seconds process `pid` and its live descendants (decode processes) have used."""
    children = []
    for task in pathlib.Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            children += [int(child) for child in task.read_text().split()]
        except OSError:
            continue
    return process_cpu_s(pid) + sum(tree_cpu_s(child) for child in children)


def cpu_ms_per_image(run_once, count: int, service_pid: int) -> tuple[float, float, float]:
    """(images/s, CPU ms per image of this process and its decode processes, of the service's
    process and its decode processes) of one run of `count` images."""
    def mine() -> float:
        return tree_cpu_s(os.getpid()) - tree_cpu_s(service_pid)

    own, other, started = mine(), tree_cpu_s(service_pid), time.perf_counter()
    run_once()
    seconds = time.perf_counter() - started
    return count / seconds, (mine() - own) * 1000 / count, (tree_cpu_s(service_pid) - other) * 1000 / count


def images_per_s(run_once, batches: int, batch: int) -> float:
    started = time.perf_counter()
    for _ in range(batches):
        run_once()
    return batches * batch / (time.perf_counter() - started)


def decode_workers(device: torch.device) -> tuple[int, int]:
    """(threads, processes) the service decodes with by default on this machine: the extractor's
    own defaults (--decode-workers, and --decode-processes -1: processes on CUDA, threads on CPU,
    one per CPU of the budget, up to 16)."""
    threads = min(MAX_DECODERS, cpu_budget().cpus)
    return threads, threads if device.type == "cuda" else 0


def decode_runner(images: list[bytes], processes: int, threads: int, step: int):
    """A function decoding all `images` for the pixels model with the service's decoder and its
    workers, in chunks of `step`, two decoding at a time, as the service does."""
    decoder = PixelDecoder(processes, threads)

    def run() -> None:
        decoding = collections.deque()
        for first in range(0, len(images), step):
            decoding.append(decoder.decode(images[first:first + step], pixels.PREPROCESS, 10**8))
            if len(decoding) == 2:
                chunk = decoding.popleft()
                chunk.result()
                chunk.release()
        for chunk in decoding:
            chunk.result()
            chunk.release()

    return run, decoder


def bulk_runner(stub, images: list[bytes], message_size: int):
    """A function streaming `images` through BulkEmbed for the pixels model at its four layers,
    `message_size` images a message, and reading every answer."""
    config = pb.EmbedConfig(model=pixels.NAME, layers=list(pixels.LAYERS))

    def requests():
        yield pb.BulkEmbedRequest(config=config)
        for start in range(0, len(images), message_size):
            yield pb.BulkEmbedRequest(images=[pb.ImageInput(id=str(i), data=images[i])
                                              for i in range(start, min(len(images), start + message_size))])

    def run() -> None:
        count = sum(1 for answer in stub.BulkEmbed(requests()) if answer.WhichOneof("result") == "vectors")
        assert count == len(images), f"{count} of {len(images)} images embedded"

    return run


def serve_answers(ports: multiprocessing.Queue) -> None:
    """A bare BulkEmbed server, run in a process of its own: each image gets one ready-made answer
    the size of the pixels model's at its four layers, with no decoding, batching or model, so
    its CPU is what gRPC alone costs for the pipeline's messages."""
    answer = pb.BulkEmbedResponse(id="0", model=pixels.NAME, pretrained=True, vectors=pb.ImageVectors(layers=[
        pb.LayerVector(layer=layer, vector=to_tensor(np.zeros(3 * size * size, np.float32)))
        for layer, size in zip(pixels.LAYERS, pixels.SIZES, strict=True)]))

    def bulk_embed(request_iterator, context):
        for message in request_iterator:
            for _ in message.images:
                yield answer

    server = create_server(8, 64)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, {
        "BulkEmbed": grpc.stream_stream_rpc_method_handler(
            bulk_embed, request_deserializer=pb.BulkEmbedRequest.FromString,
            response_serializer=pb.BulkEmbedResponse.SerializeToString)}),))
    ports.put(bind(server, "127.0.0.1", 0))
    server.start()
    server.wait_for_termination()


def throughput(make_call, clients: int, seconds: float) -> float:
    """Calls/s of `clients` threads, each calling its own `make_call()` result in a loop."""
    done = [0] * clients
    calls = [make_call() for _ in range(clients)]
    stop = time.perf_counter() + seconds

    def client(slot: int) -> None:
        while time.perf_counter() < stop:
            calls[slot]()
            done[slot] += 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sum(done) / (time.perf_counter() - started)


def p50_ms(call, seconds: float) -> float:
    """Median latency, in ms, of `call()` made one after another."""
    stop, latencies = time.perf_counter() + seconds, []
    while time.perf_counter() < stop:
        started = time.perf_counter()
        call()
        latencies.append((time.perf_counter() - started) * 1000)
    return float(np.median(latencies))


def single_image_embed(stub, config, image: bytes):
    """A call embedding one image, as a single-image client makes it."""
    return functools.partial(stub.Embed, pb.EmbedRequest(config=config, images=[image]))


def start_burner() -> subprocess.Popen:
    """A process spinning on one CPU (the last this process may use), pinned there."""
    cpu = max(os.sched_getaffinity(0))
    return subprocess.Popen([sys.executable, "-c", f"import os\nos.sched_setaffinity(0, {{{cpu}}})\nwhile True: pass"])


def contended(args, device: torch.device, image: bytes) -> dict[str, float]:
    """The contended figures: the service with its defaults and with its CPU pools forced to 1,
    side by side beside a CPU burner, in alternating rounds (medians)."""
    common = ("--metrics-port", "-1", "--device", str(device), "--default-model", args.model)
    settings = {"": (), "forced1_": FORCED_TO_ONE}
    services = {}
    burner = start_burner()
    try:
        for prefix, extra in settings.items():
            services[prefix] = start_service("convsearch-extractor", *common, *extra, service=SERVICE_NAME)
        config = pb.EmbedConfig(model=args.model, layers=[args.layer])
        stubs = {prefix: extractor_pb2_grpc.ExtractorServiceStub(create_channel(address))
                 for prefix, (_, address) in services.items()}
        runs: dict[str, list[float]] = {f"{prefix}{name}": [] for prefix in settings
                                        for name in ("contended_img_s", "contended_p50_ms")}
        for round_ in range(args.contended_rounds):
            for prefix, stub in stubs.items():
                stub.Embed(pb.EmbedRequest(config=config, images=[image]))
                runs[f"{prefix}contended_img_s"].append(
                    throughput(functools.partial(single_image_embed, stub, config, image), args.clients,
                               args.contended_seconds))
                runs[f"{prefix}contended_p50_ms"].append(p50_ms(single_image_embed(stub, config, image),
                                                                args.contended_seconds / 2))
                print(f"contended round {round_ + 1}, {'defaults' if not prefix else 'CPU pools forced to 1'}: "
                      f"{runs[f'{prefix}contended_img_s'][-1]:.1f} img/s ({args.clients} clients), "
                      f"p50 {runs[f'{prefix}contended_p50_ms'][-1]:.0f} ms (1 client)", flush=True)
    finally:
        for process, _ in services.values():
            stop_service(process)
        burner.kill()
        burner.wait()
    return {name: float(np.median(values)) for name, values in runs.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="efficientnet_lite0")
    parser.add_argument("--layer", default="_conv_head")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--batches", type=int, default=3, help="batches per round and side")
    parser.add_argument("--rounds", type=int, default=4, help="alternating rounds; medians reported")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--decode-processes", type=int, default=-1,
                        help="the service's decoding processes (-1 auto, 0 threads)")
    parser.add_argument("--pipeline-images", type=int, default=512,
                        help="JPEGs per BulkEmbed stream (and per in-process decode) of the pipeline measure")
    parser.add_argument("--contended-seconds", type=float, default=10.0,
                        help="seconds of each contended throughput measure (half that for the p50)")
    parser.add_argument("--contended-rounds", type=int, default=2, help="alternating rounds under contention")
    args = parser.parse_args()
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else "cpu" if args.device == "auto" else args.device)
    images = photos(args.batch)
    threads, auto_processes = decode_workers(device)
    processes = auto_processes if args.decode_processes < 0 else args.decode_processes
    many = [images[i % len(images)] for i in range(args.pipeline_images)]
    run_decode, decoder = decode_runner(many, processes, threads, args.batch)

    run_inprocess = inprocess_runner(args.model, args.layer, images, device)
    answering = None
    process, address = start_service(
        "convsearch-extractor", "--metrics-port", "-1", "--device", str(device),
        "--max-batch", str(args.batch), "--default-model", args.model,
        "--decode-processes", str(args.decode_processes), service=SERVICE_NAME)
    try:
        stub = extractor_pb2_grpc.ExtractorServiceStub(create_channel(address))
        config = pb.EmbedConfig(model=args.model, layers=[args.layer])
        request = pb.EmbedRequest(config=config, images=images)
        run_service = lambda: stub.Embed(request)  # noqa: E731
        run_inprocess()
        run_service()
        # Alternate the two sides so that the machine's drift hits both alike.
        inprocess_runs, service_runs = [], []
        for round_ in range(args.rounds):
            inprocess_runs.append(images_per_s(run_inprocess, args.batches, args.batch))
            service_runs.append(images_per_s(run_service, args.batches, args.batch))
            print(f"round {round_ + 1}: in-process {inprocess_runs[-1]:.1f} img/s, "
                  f"service {service_runs[-1]:.1f} img/s (batch {args.batch})", flush=True)
        inprocess_img_s = float(np.median(inprocess_runs))
        service_img_s = float(np.median(service_runs))
        concurrent_img_s = throughput(functools.partial(single_image_embed, stub, config, images[0]), args.clients,
                                      args.seconds)
        print(f"service, {args.clients} concurrent single-image clients: {concurrent_img_s:.1f} img/s",
              flush=True)
        run_pipeline = bulk_runner(stub, many, args.batch)
        run_pipeline()
        run_decode()
        ports = multiprocessing.get_context("spawn").Queue()
        answering = multiprocessing.get_context("spawn").Process(target=serve_answers, args=(ports,), daemon=True)
        answering.start()
        run_transport = bulk_runner(extractor_pb2_grpc.ExtractorServiceStub(
            create_channel(f"127.0.0.1:{ports.get(timeout=120)}")), many, args.batch)
        run_transport()
        # CPU per image as well as images/s: on a shared machine the rates drift, the CPU much less.
        decode_runs, pipeline_runs, transport_runs = [], [], []
        for round_ in range(args.rounds):
            decode_runs.append(cpu_ms_per_image(run_decode, len(many), process.pid))
            pipeline_runs.append(cpu_ms_per_image(run_pipeline, len(many), process.pid))
            transport_runs.append(cpu_ms_per_image(run_transport, len(many), answering.pid))
            print(f"round {round_ + 1}: decode in-process {decode_runs[-1][0]:.1f} img/s "
                  f"({decode_runs[-1][1]:.2f} CPU ms/img), pixels through the service {pipeline_runs[-1][0]:.1f} "
                  f"img/s (service {pipeline_runs[-1][2]:.2f} + client {pipeline_runs[-1][1]:.2f} CPU ms/img; "
                  f"{len(many)} JPEGs, {f'{processes} processes' if processes else f'{threads} threads'}), "
                  f"gRPC alone {transport_runs[-1][0]:.1f} img/s (server {transport_runs[-1][2]:.2f} + client "
                  f"{transport_runs[-1][1]:.2f} CPU ms/img)", flush=True)
        decode_img_s, decode_cpu_ms, _ = (float(v) for v in np.median(decode_runs, axis=0))
        pipeline_img_s, client_cpu_ms, service_cpu_ms = (float(v) for v in np.median(pipeline_runs, axis=0))
        transport_img_s, transport_client_ms, transport_server_ms = (
            float(v) for v in np.median(transport_runs, axis=0))
    finally:
        stop_service(process)
        decoder.shutdown()
        if answering is not None:
            answering.kill()
    under_contention = contended(args, device, images[0])
    print(json.dumps({
        "model": args.model, "layer": args.layer, "batch": args.batch, "device": device_name(device),
        "decode_device": "cuda" if device_decoder("auto", device) else "cpu",
        "decode_processes": args.decode_processes,
        "service_img_s": round(service_img_s, 2), "inprocess_img_s": round(inprocess_img_s, 2),
        "ratio": round(service_img_s / inprocess_img_s, 3),
        "concurrent_img_s": round(concurrent_img_s, 2),
        "concurrent_vs_batched": round(concurrent_img_s / service_img_s, 3),
        "pipeline_img_s": round(pipeline_img_s, 2), "decode_img_s": round(decode_img_s, 2),
        "pipeline_ratio": round(pipeline_img_s / decode_img_s, 3),
        "pipeline_images": len(many), "decode_workers": processes or threads,
        "decode_in": "processes" if processes else "threads",
        # Where the pipeline's time goes: CPU ms per image, decode processes included.
        "decode_cpu_ms": round(decode_cpu_ms, 3), "pipeline_service_cpu_ms": round(service_cpu_ms, 3),
        "pipeline_client_cpu_ms": round(client_cpu_ms, 3),
        # gRPC alone, the pipeline's messages answered by a bare server; where the CPUs are the
        # limit, the pipeline can reach at most transport_bound_ratio of the decoder's images/s.
        "transport_img_s": round(transport_img_s, 2), "transport_server_cpu_ms": round(transport_server_ms, 3),
        "transport_client_cpu_ms": round(transport_client_ms, 3),
        "transport_bound_ratio": round(decode_cpu_ms / (decode_cpu_ms + transport_server_ms + transport_client_ms), 3),
        "cpu_budget": cpu_budget().cpus,
        **{name: round(value, 2) for name, value in under_contention.items()},
        "contended_ratio": round(under_contention["contended_img_s"] / under_contention["forced1_contended_img_s"], 3),
    }))


if __name__ == "__main__":
    main()
