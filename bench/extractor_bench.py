"""Extractor throughput: images/s through the service over gRPC (JPEG in, vectors out) against
the same model, layer and batch size run in-process, plus many concurrent single-image clients.

Last stdout line: one JSON object (service_img_s, inprocess_img_s, ratio, concurrent_img_s, ...).
"""

import argparse
import io
import json
import pathlib
import tempfile
import threading
import time

import numpy as np
import torch
from PIL import Image
from skimage import data as skdata

from convsearch.channels import create_channel
from convsearch.extractor.v1 import extractor_pb2 as pb
from convsearch.extractor.v1 import extractor_pb2_grpc
from convsearch.processes import start_service, stop_service
from convsearch_extractor.catalog import load_catalog
from convsearch_extractor.imaging import decode
from convsearch_extractor.runtime import EmbedSpec, LoadedModel
from convsearch_extractor.server import SERVICE_NAME


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
    """A function running one forward pass of the pre-decoded batch in this process: the ceiling."""
    spec = load_catalog(pathlib.Path(tempfile.mkdtemp()))[model]
    loaded = LoadedModel(spec, spec.build(True), True, device)
    pixels = np.stack([decode(image, spec.preprocess, 10**8) for image in images])
    embed = EmbedSpec(model, (layer,))
    return lambda: loaded.embed(pixels, embed)


def images_per_s(run_once, batches: int, batch: int) -> float:
    started = time.perf_counter()
    for _ in range(batches):
        run_once()
    return batches * batch / (time.perf_counter() - started)


def concurrent_clients(stub, config, image: bytes, clients: int, seconds: float) -> float:
    done = [0] * clients
    stop = time.perf_counter() + seconds
    request = pb.EmbedRequest(config=config, images=[image])

    def client(slot: int) -> None:
        while time.perf_counter() < stop:
            stub.Embed(request)
            done[slot] += 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sum(done) / (time.perf_counter() - started)


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
    args = parser.parse_args()
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else "cpu" if args.device == "auto" else args.device)
    images = photos(args.batch)

    run_inprocess = inprocess_runner(args.model, args.layer, images, device)
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
        concurrent_img_s = concurrent_clients(stub, config, images[0], args.clients, args.seconds)
        print(f"service, {args.clients} concurrent single-image clients: {concurrent_img_s:.1f} img/s",
              flush=True)
    finally:
        stop_service(process)
    print(json.dumps({
        "model": args.model, "layer": args.layer, "batch": args.batch, "device": device_name(device),
        "decode_processes": args.decode_processes,
        "service_img_s": round(service_img_s, 2), "inprocess_img_s": round(inprocess_img_s, 2),
        "ratio": round(service_img_s / inprocess_img_s, 3),
        "concurrent_img_s": round(concurrent_img_s, 2),
        "concurrent_vs_batched": round(concurrent_img_s / service_img_s, 3),
    }))


if __name__ == "__main__":
    main()
