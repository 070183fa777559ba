"""Read replicas: how far behind a follower is and how fast it catches up, with the primary and
its followers as real `convsearch-index` processes (fsync on, the defaults).

- lag: under a steady background write load (upserts of 16 vectors, then a 1/--load-rate s
  pause; 0: none), a probe writes one vector at the primary, then reads it back from a follower
  with the reply's version as min_version: the time from the write's acknowledgement to that
  read's answer (lag_p50_ms, lag_p99_ms, lag_max_ms), once the follower holds the set-up.
  load_vectors_s is the load the primary took. The load cycles through --load-ids ids, so once
  each has a vector it replaces vectors (each replaced one leaves a deleted graph node, which
  compaction drops, beside the writes, on the primary and on the follower); a longer
  --lag-seconds measures more of that steady state.
- catch-up: a fresh follower of a primary holding --n x --dim vectors (checkpointed, as a
  primary is in steady state), as two figures:
  - catch_up_vec_s = --n / copy_s, where copy_s is the whole copy as the follower itself timed it
    and logged it ("caught up with a whole copy ... in X s from asking for it"): from opening the
    Replicate stream to every item stored, every file received, fsync'd, verified and loaded,
    and its position recorded, i.e. until it turns SERVING. Process start-up is not in it.
  - launch_to_serving_s (and launch_vec_s = --n over it): from launching the follower process
    until its health check answers SERVING, as the bench's client sees it: copy_s plus process
    start-up (imports, opening its data dir, binding) plus health polling (every 0.1 s).
- queries/s of one client, k=10, one query a call, on the primary and on that follower.

--lag-only runs the lag part alone. Last stdout line: one JSON object (lag_p50_ms, lag_p99_ms,
catch_up_vec_s, copy_s, launch_to_serving_s, primary_qps, follower_qps, ...).
"""

import argparse
import json
import re
import tempfile
import threading
import time

import numpy as np

from convsearch.channels import create_channel
from convsearch.index.v1 import index_pb2 as pb
from convsearch.index.v1 import index_pb2_grpc
from convsearch.processes import start_service, stop_service
from convsearch.synthetic import clustered_vectors
from convsearch.tensors import to_tensor
from convsearch_index.server import SERVICE_NAME

COLLECTION = "bench/layer/avg/cosine"


def _spec(dim: int, ef_construction: int) -> pb.CollectionSpec:
    return pb.CollectionSpec(model="bench", layer="layer", dimension=dim, ef_construction=ef_construction)


def _background_writes(stub, dim: int, rate: float, load_ids: int, stop: threading.Event, done: list) -> None:
    """Upserts 16 vectors, waits 1/rate s, again until `stop`; `done` gets the vectors written."""
    rng, n = np.random.default_rng(1), 0
    while not stop.is_set():
        ids = [f"bg{(n + k) % load_ids}" for k in range(16)]
        n += 16
        stub.UpsertVectors(pb.UpsertVectorsRequest(dataset="lag", collection=COLLECTION, ids=ids,
                                                   vectors=to_tensor(rng.normal(size=(16, dim)).astype(np.float32))))
        done.append(16)
        stop.wait(1 / rate)


def _copy_seconds(follower_log: str) -> float:
    """The seconds of the whole copy, as the follower logged them (see follower.py)."""
    found = re.findall(r"caught up with a whole copy at version \d+ .* in ([0-9.]+)s from asking for it",
                       follower_log)
    if not found:
        raise RuntimeError(f"the follower did not log its copy:\n{follower_log}")
    return float(found[-1])


def _probe(primary, follower, item_id: str, rng: np.random.Generator, dim: int) -> float:
    """Writes one vector at the primary and reads it back from the follower: milliseconds from
    the write's acknowledgement to the read's answer."""
    vector = to_tensor(rng.normal(size=(1, dim)).astype(np.float32))
    reply = primary.UpsertVectors(pb.UpsertVectorsRequest(dataset="lag", collection=COLLECTION, ids=[item_id],
                                                          vectors=vector))
    acknowledged = time.perf_counter()
    follower.GetVectors(pb.GetVectorsRequest(dataset="lag", collection=COLLECTION, ids=[item_id], ids_only=True,
                                             min_version=reply.version), timeout=30)
    return (time.perf_counter() - acknowledged) * 1000


def measure_lag(primary, follower, dim: int, seconds: float, load_rate: float,
                load_ids: int = 5000) -> tuple[list[float], float]:
    """The probes' lags (ms) and the background load the primary took (vectors/s)."""
    primary.CreateDataset(pb.CreateDatasetRequest(name="lag"))
    for start in range(0, load_ids, 5000):
        primary.PutItems(pb.PutItemsRequest(dataset="lag", items=[
            pb.Item(id=f"bg{n}") for n in range(start, min(start + 5000, load_ids))]))
    primary.PutItems(pb.PutItemsRequest(dataset="lag", items=[pb.Item(id=f"probe{n}") for n in range(100)]))
    primary.CreateCollection(pb.CreateCollectionRequest(dataset="lag", spec=_spec(dim, 200)))
    rng = np.random.default_rng(2)
    _probe(primary, follower, "probe0", rng, dim)  # the follower holds the set-up before the clock starts
    stop = threading.Event()
    written: list[int] = []
    load = threading.Thread(target=_background_writes, args=(primary, dim, load_rate, load_ids, stop, written))
    if load_rate > 0:
        load.start()
    lags, n = [], 0
    started = time.monotonic()
    deadline = started + seconds
    try:
        while time.monotonic() < deadline:
            lags.append(_probe(primary, follower, f"probe{n % 100}", rng, dim))
            n += 1
            time.sleep(0.02)
    finally:
        stop.set()
        if load.is_alive():
            load.join()
    return lags, sum(written) / (time.monotonic() - started)


def queries_per_s(stub, queries: np.ndarray, seconds: float) -> float:
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        stub.Search(pb.SearchRequest(dataset="big", collection=COLLECTION, k=10,
                                     queries=to_tensor(queries[done % len(queries)][None])))
        done += 1
    return done / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--lag-seconds", type=float, default=15.0)
    parser.add_argument("--load-rate", type=float, default=50.0, help="background upsert batches a second")
    parser.add_argument("--load-ids", type=int, default=5000,
                        help="ids the background load cycles through: once each has a vector, the load replaces "
                             "vectors instead of inserting new ones")
    parser.add_argument("--ef-construction", type=int, default=40, help="of the big collection (build time only)")
    parser.add_argument("--qps-seconds", type=float, default=5.0)
    parser.add_argument("--lag-only", action="store_true", help="measure the lag only")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        primary_process, primary_address = start_service(
            "convsearch-index", "--data-dir", f"{work}/p", "--checkpoint-interval-s", "5", service=SERVICE_NAME)
        primary = index_pb2_grpc.IndexServiceStub(create_channel(primary_address))
        follower_process, follower_address = start_service(
            "convsearch-index", "--data-dir", f"{work}/f1", "--follow", primary_address, service=SERVICE_NAME)
        follower = index_pb2_grpc.IndexServiceStub(create_channel(follower_address))
        lags, load_vectors_s = measure_lag(primary, follower, args.dim, args.lag_seconds, args.load_rate, args.load_ids)
        stop_service(follower_process)
        lag_p50, lag_p99 = (float(np.percentile(lags, q)) for q in (50, 99))
        print(f"lag over {len(lags)} probes at {load_vectors_s:.0f} vectors/s of load (asked: "
              f"{args.load_rate * 16:.0f}): p50 {lag_p50:.1f} ms, p99 {lag_p99:.1f} ms, max {max(lags):.1f} ms",
              flush=True)
        lag = {"lag_p50_ms": round(lag_p50, 2), "lag_p99_ms": round(lag_p99, 2), "lag_max_ms": round(max(lags), 2),
               "lag_probes": len(lags), "load_vectors_s": round(load_vectors_s)}
        if args.lag_only:
            stop_service(primary_process)
            print(json.dumps(lag))
            return

        vectors = clustered_vectors(args.n, args.dim)
        primary.CreateDataset(pb.CreateDatasetRequest(name="big"))
        for start in range(0, args.n, 5000):
            primary.PutItems(pb.PutItemsRequest(dataset="big", items=[
                pb.Item(id=f"v{i}", label=f"c{i % 10}") for i in range(start, min(start + 5000, args.n))]))
        primary.CreateCollection(pb.CreateCollectionRequest(dataset="big", spec=_spec(args.dim, args.ef_construction)))
        started = time.perf_counter()
        for start in range(0, args.n, 1000):
            primary.UpsertVectors(pb.UpsertVectorsRequest(
                dataset="big", collection=COLLECTION, ids=[f"v{i}" for i in range(start, min(start + 1000, args.n))],
                vectors=to_tensor(vectors[start:start + 1000])))
        print(f"primary: {args.n} x {args.dim}-d upserted in {time.perf_counter() - started:.1f}s", flush=True)
        time.sleep(12)  # the primary's periodic checkpoint (every 5 s) folds the log in

        started = time.perf_counter()
        follower_process, follower_address = start_service(
            "convsearch-index", "--data-dir", f"{work}/f2", "--follow", primary_address, service=SERVICE_NAME,
            timeout_s=600)
        launch_s = time.perf_counter() - started
        follower = index_pb2_grpc.IndexServiceStub(create_channel(follower_address))
        count = follower.GetCollectionStats(pb.GetCollectionStatsRequest(dataset="big", collection=COLLECTION))
        assert count.collection.count == args.n, count

        queries = clustered_vectors(500, args.dim, seed=1)
        primary_qps = queries_per_s(primary, queries, args.qps_seconds)
        follower_qps = queries_per_s(follower, queries, args.qps_seconds)
        print(f"queries/s (one client, k=10): primary {primary_qps:.0f}, follower {follower_qps:.0f}", flush=True)
        copy_s = _copy_seconds(stop_service(follower_process))
        print(f"fresh follower: whole copy of {args.n} vectors in {copy_s:.2f}s (its own timing); SERVING "
              f"{launch_s:.2f}s after launch", flush=True)
        stop_service(primary_process)
    print(json.dumps({**lag, "catch_up_vec_s": round(args.n / copy_s), "copy_s": round(copy_s, 2),
                      "launch_to_serving_s": round(launch_s, 2), "launch_vec_s": round(args.n / launch_s),
                      "primary_qps": round(primary_qps), "follower_qps": round(follower_qps),
                      "n": args.n, "dim": args.dim}))


if __name__ == "__main__":
    main()
