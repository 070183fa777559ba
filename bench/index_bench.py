"""Index search speed: queries/s through the index service over gRPC against raw hnswlib
in-process on the same vectors and parameters, at 1 and 64 queries per call, with recall@10
against exact search for both; plus upsert throughput and memory per vector: as the collection
counts it (bytes_per_vector) and as the process's resident memory grew (rss_bytes_per_vector).

Last stdout line: one JSON object (grpc_qps_b1, raw_qps_b1, grpc_qps_b64, raw_qps_b64, ...).
"""

import argparse
import json
import tempfile
import time

import hnswlib
import numpy as np

from convsearch.channels import create_channel
from convsearch.index.v1 import index_pb2 as pb
from convsearch.index.v1 import index_pb2_grpc
from convsearch.processes import start_service, stop_service
from convsearch.synthetic import clustered_vectors
from convsearch.tensors import to_tensor
from convsearch_index.distances import exact_knn
from convsearch_index.server import SERVICE_NAME

M, EF_CONSTRUCTION, EF, K = 16, 200, 64, 10
COLLECTION = "bench/layer/avg/cosine"


def recall(found: list[list[int]], truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t)) / K for f, t in zip(found, truth, strict=True)]))


def qps(search_batch, queries: np.ndarray, batch: int) -> tuple[float, list[list[int]]]:
    found = []
    started = time.perf_counter()
    for start in range(0, len(queries), batch):
        found += search_batch(queries[start:start + batch])
    return len(queries) / (time.perf_counter() - started), found


def rss_bytes(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--queries", type=int, default=2000)
    parser.add_argument("--upsert-batch", type=int, default=1000)
    args = parser.parse_args()
    vectors = clustered_vectors(args.n, args.dim)
    queries = clustered_vectors(args.queries, args.dim, seed=1)
    truth, _ = exact_knn(queries, vectors, np.arange(args.n), K, "cosine")
    print(f"{args.n} x {args.dim}-d vectors, {args.queries} queries, cosine, M={M}, "
          f"ef_construction={EF_CONSTRUCTION}, ef={EF}", flush=True)

    raw = hnswlib.Index(space="cosine", dim=args.dim)
    raw.init_index(max_elements=args.n, M=M, ef_construction=EF_CONSTRUCTION)
    started = time.perf_counter()
    raw.add_items(vectors, np.arange(args.n))
    raw_build_s = time.perf_counter() - started
    raw.set_ef(EF)
    raw_search = lambda batch: raw.knn_query(batch, k=K)[0].tolist()  # noqa: E731
    raw_b1, raw_found = qps(raw_search, queries, 1)
    raw_b64, _ = qps(raw_search, queries, 64)
    print(f"raw hnswlib: build {raw_build_s:.1f}s, {raw_b1:.0f} q/s at batch 1, {raw_b64:.0f} q/s at batch 64, "
          f"recall@10 {recall(raw_found, truth):.4f}", flush=True)

    with tempfile.TemporaryDirectory() as data_dir:
        process, address = start_service("convsearch-index", "--data-dir", data_dir, service=SERVICE_NAME)
        try:
            stub = index_pb2_grpc.IndexServiceStub(create_channel(address))
            stub.CreateDataset(pb.CreateDatasetRequest(name="bench"))
            ids = [str(i) for i in range(args.n)]
            for start in range(0, args.n, 10_000):
                items = [pb.Item(id=i) for i in ids[start:start + 10_000]]
                stub.PutItems(pb.PutItemsRequest(dataset="bench", items=items))
            stub.CreateCollection(pb.CreateCollectionRequest(dataset="bench", spec=pb.CollectionSpec(
                model="bench", layer="layer", dimension=args.dim, m=M, ef_construction=EF_CONSTRUCTION, ef=EF)))
            rss_before = rss_bytes(process.pid)
            started = time.perf_counter()
            for start in range(0, args.n, args.upsert_batch):
                stub.UpsertVectors(pb.UpsertVectorsRequest(
                    dataset="bench", collection=COLLECTION, ids=ids[start:start + args.upsert_batch],
                    vectors=to_tensor(vectors[start:start + args.upsert_batch])))
            upsert_vec_s = args.n / (time.perf_counter() - started)
            rss_per_vector = (rss_bytes(process.pid) - rss_before) / args.n
            print(f"service: upserts {upsert_vec_s:.0f} vectors/s (batches of {args.upsert_batch}, fsync'd)",
                  flush=True)

            def grpc_search(batch):
                reply = stub.Search(pb.SearchRequest(dataset="bench", collection=COLLECTION,
                                                     queries=to_tensor(batch), k=K))
                return [list(map(int, result.ids)) for result in reply.results]

            grpc_b1, grpc_found = qps(grpc_search, queries, 1)
            grpc_b64, _ = qps(grpc_search, queries, 64)
            stats = stub.GetCollectionStats(pb.GetCollectionStatsRequest(dataset="bench", collection=COLLECTION))
            print(f"service: {grpc_b1:.0f} q/s at batch 1, {grpc_b64:.0f} q/s at batch 64, "
                  f"recall@10 {recall(grpc_found, truth):.4f}", flush=True)
        finally:
            stop_service(process)
    print(json.dumps({
        "n": args.n, "dim": args.dim, "metric": "cosine", "m": M, "ef_construction": EF_CONSTRUCTION, "ef": EF,
        "grpc_qps_b1": round(grpc_b1, 1), "raw_qps_b1": round(raw_b1, 1),
        "grpc_qps_b64": round(grpc_b64, 1), "raw_qps_b64": round(raw_b64, 1),
        "ratio_b1": round(grpc_b1 / raw_b1, 3), "ratio_b64": round(grpc_b64 / raw_b64, 3),
        "recall_at_10": round(recall(grpc_found, truth), 4), "raw_recall_at_10": round(recall(raw_found, truth), 4),
        "upsert_vec_s": round(upsert_vec_s, 1), "raw_build_vec_s": round(args.n / raw_build_s, 1),
        "bytes_per_vector": round(stats.collection.memory_bytes / stats.collection.count, 1),
        "rss_bytes_per_vector": round(rss_per_vector, 1), "raw_bytes_per_vector": args.dim * 4,
        "memory_ratio": round(stats.collection.memory_bytes / stats.collection.count / (args.dim * 4), 3),
    }))


if __name__ == "__main__":
    main()
