"""Load through the gateway: concurrent clients mixing searches by id, searches by image and
ingests (each embedding what it stores), while idle streams are held open and a thread checks
the gateway's health every second. Starts its own extractor, index and gateway as processes
(convsearch.processes.start_service) on fashion200. Not part of CI.

    .venv/bin/python bench/load_bench.py --clients 64 --duration 60 --idle-streams 32

Target: 0 errors and health answering throughout. Last stdout line: one JSON object (qps,
p50_ms, p99_ms, errors, health_failures, rss_growth_mb per service, per-operation figures).
"""

import argparse
import collections
import json
import random
import tempfile
import threading
import time

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from convsearch.channels import create_channel
from convsearch.cli import FASHION200, read_items
from convsearch.client import Client
from convsearch.embedding import Configuration
from convsearch.errors import ConvsearchError
from convsearch.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from convsearch.local import EXTRACTOR, GATEWAY, INDEX
from convsearch.processes import start_service, stop_service

LAYER = "_conv_head"
CONFIG = Configuration("efficientnet_lite0", (LAYER,))
MIX = (("search_id", 0.6), ("search_image", 0.25), ("ingest", 0.15))


def rss_mb(pid: int) -> float:
    """Resident memory of a process, from /proc/PID/status (VmRSS, kB)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


class Tally:
    """Latencies and errors of every operation, from many threads."""

    def __init__(self):
        self.lock = threading.Lock()
        self.latencies: dict[str, list[float]] = collections.defaultdict(list)
        self.errors: collections.Counter = collections.Counter()
        self.examples: dict[str, str] = {}

    def ok(self, op: str, seconds: float) -> None:
        with self.lock:
            self.latencies[op].append(1000 * seconds)

    def failed(self, op: str, exc: Exception) -> None:
        with self.lock:
            self.errors[op] += 1
            self.examples.setdefault(op, f"{type(exc).__name__}: {exc}"[:300])


def client_loop(gateway: str, items, stop: threading.Event, tally: Tally, seed: int, timeout_s: float) -> None:
    rng = random.Random(seed)
    ops, weights = zip(*MIX, strict=True)
    counter = 0
    with Client(gateway, timeout_s=timeout_s) as client:
        while not stop.is_set():
            op = rng.choices(ops, weights)[0]
            started = time.perf_counter()
            try:
                if op == "search_id":
                    client.search("load", item_id=rng.choice(items)[0], configuration=CONFIG, k=15)
                elif op == "search_image":
                    client.search("load", image=rng.choice(items)[2], configuration=CONFIG, k=15)
                else:
                    counter += 1
                    batch = [(f"load-{seed}-{counter}-{n}", label, data)
                             for n, (_, label, data) in enumerate(rng.sample(items, 2))]
                    results = list(client.ingest("load", batch, [CONFIG]))
                    bad = [r for r in results if r.status == "failed" or r.error]
                    if bad:
                        raise RuntimeError(f"ingest item {bad[0].id}: {bad[0].error}")
                tally.ok(op, time.perf_counter() - started)
            except (ConvsearchError, RuntimeError, grpc.RpcError) as exc:
                tally.failed(op, exc)


def idle_stream(gateway: str, stop: threading.Event, counts: collections.Counter, lock: threading.Lock) -> None:
    """Holds an Ingest stream open that sends nothing; reopens it when the gateway ends it for
    idleness (that is the gateway's idle-stream limit at work, not an error)."""
    channel = create_channel(gateway)
    stub = gateway_pb2_grpc.GatewayServiceStub(channel)

    def nothing():
        stop.wait()
        return
        yield gateway_pb2.IngestRequest()  # never reached: a generator that sends nothing

    try:
        while not stop.is_set():
            call = stub.Ingest(nothing())
            try:
                for _ in call:
                    pass
                with lock:
                    counts["closed_at_end"] += 1
            except grpc.RpcError as exc:
                with lock:
                    counts[exc.code().name] += 1
                if stop.is_set():
                    return
                time.sleep(0.1)
    finally:
        channel.close()


def health_loop(gateway: str, stop: threading.Event, result: dict) -> None:
    channel = create_channel(gateway)
    health = health_pb2_grpc.HealthStub(channel)
    while not stop.wait(1.0):
        started = time.perf_counter()
        try:
            reply = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=2.0)
            result["checks"] += 1
            result["max_ms"] = max(result["max_ms"], 1000 * (time.perf_counter() - started))
            if reply.status != health_pb2.HealthCheckResponse.SERVING:
                result["failures"] += 1
        except grpc.RpcError:
            result["checks"] += 1
            result["failures"] += 1
    channel.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=64, help="concurrent clients")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load")
    parser.add_argument("--idle-streams", type=int, default=32, help="Ingest streams held open, sending nothing")
    parser.add_argument("--timeout", type=float, default=60.0, help="each client call's deadline, seconds")
    parser.add_argument("--gateway-args", default="--max-concurrent-rpcs 192 --max-concurrent-streams 128",
                        help="extra flags for the gateway (room for the clients and the idle streams)")
    args = parser.parse_args()
    items = list(read_items(FASHION200))
    processes = {}
    with tempfile.TemporaryDirectory() as data_dir:
        try:
            processes["extractor"], extractor = start_service("convsearch-extractor", "--metrics-port", "-1",
                                                              service=EXTRACTOR)
            processes["index"], index = start_service("convsearch-index", "--data-dir", f"{data_dir}/index",
                                                      "--metrics-port", "-1", service=INDEX)
            processes["gateway"], gateway = start_service(
                "convsearch-gateway", "--extractor", extractor, "--index", index, "--metrics-port", "-1",
                *args.gateway_args.split(), service=GATEWAY)
            with Client(gateway, timeout_s=600) as client:
                client.create_dataset("load")
                stored = sum(r.status == "stored" for r in client.ingest("load", items))
                list(client.index("load", [CONFIG]))
                client.search("load", image=items[0][2], configuration=CONFIG, k=15)  # warm
            print(f"fashion200: {stored} items stored and indexed; load: {args.clients} clients, "
                  f"{args.idle_streams} idle streams, {args.duration:g} s", flush=True)

            rss_before = {name: rss_mb(process.pid) for name, process in processes.items()}
            stop, idle_stop = threading.Event(), threading.Event()
            tally = Tally()
            stream_counts: collections.Counter = collections.Counter()
            stream_lock = threading.Lock()
            health = {"checks": 0, "failures": 0, "max_ms": 0.0}
            threads = [threading.Thread(target=idle_stream, args=(gateway, idle_stop, stream_counts, stream_lock),
                                        daemon=True) for _ in range(args.idle_streams)]
            threads.append(threading.Thread(target=health_loop, args=(gateway, idle_stop, health), daemon=True))
            for thread in threads:
                thread.start()
            time.sleep(1.0)  # the idle streams are open before the load starts
            workers = [threading.Thread(target=client_loop, args=(gateway, items, stop, tally, seed, args.timeout),
                                        daemon=True) for seed in range(args.clients)]
            started = time.perf_counter()
            for worker in workers:
                worker.start()
            time.sleep(args.duration)
            stop.set()
            for worker in workers:
                worker.join(args.timeout + 5)
            elapsed = time.perf_counter() - started
            idle_stop.set()
            for thread in threads:
                thread.join(10)
            rss_after = {name: rss_mb(process.pid) for name, process in processes.items()}
        finally:
            logs = {name: stop_service(process) for name, process in reversed(list(processes.items()))}
    for name, log in logs.items():
        if "Traceback" in log:
            print(f"--- {name} logged a traceback:\n{log[-3000:]}", flush=True)
    every = np.array([value for values in tally.latencies.values() for value in values] or [0.0])
    operations = {op: {"count": len(values), "p50_ms": round(float(np.percentile(values, 50)), 2),
                       "p99_ms": round(float(np.percentile(values, 99)), 2), "errors": tally.errors[op]}
                  for op, values in sorted(tally.latencies.items())}
    for op, example in tally.examples.items():
        print(f"first {op} error: {example}", flush=True)
    print(json.dumps({
        "clients": args.clients, "duration_s": round(elapsed, 1), "idle_streams": args.idle_streams,
        "qps": round(sum(len(v) for v in tally.latencies.values()) / elapsed, 2),
        "p50_ms": round(float(np.percentile(every, 50)), 2), "p99_ms": round(float(np.percentile(every, 99)), 2),
        "errors": sum(tally.errors.values()),
        "health_checks": health["checks"], "health_failures": health["failures"],
        "health_max_ms": round(health["max_ms"], 2),
        "idle_stream_endings": dict(stream_counts),
        "rss_mb": {name: round(value, 1) for name, value in rss_after.items()},
        "rss_growth_mb": {name: round(rss_after[name] - rss_before[name], 1) for name in rss_before},
        "operations": operations,
    }))


if __name__ == "__main__":
    main()
