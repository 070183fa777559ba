"""Evaluation speed: the gateway's Evaluate over N labeled items at lite0's 8 featured layers x
2 metrics with every vector already indexed, against the same queries issued directly to
hnswlib in-process (the same vectors and parameters, k = 16, each item querying once).

Last stdout line: one JSON object (eval_s, raw_s, ratio, items, configs).
"""

import argparse
import json
import tempfile
import time

import hnswlib
import numpy as np

from convsearch.channels import create_channel
from convsearch.client import Client
from convsearch.common.v1 import common_pb2
from convsearch.extractor.v1 import extractor_pb2, extractor_pb2_grpc
from convsearch.index.v1 import index_pb2, index_pb2_grpc
from convsearch.local import LocalStack
from convsearch.naming import collection_name
from convsearch.synthetic import clustered_vectors
from convsearch.tensors import to_tensor

MODEL = "efficientnet_lite0"
METRICS = {"cosine": ("cosine", common_pb2.METRIC_COSINE), "euclidean": ("l2", common_pb2.METRIC_EUCLIDEAN)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--items", type=int, default=10_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as data_dir, LocalStack(data_dir) as stack, Client(stack.gateway) as client:
        extractor = extractor_pb2_grpc.ExtractorServiceStub(create_channel(stack.extractor))
        index = index_pb2_grpc.IndexServiceStub(create_channel(stack.index))
        model = next(m for m in extractor.ListModels(extractor_pb2.ListModelsRequest()).models if m.name == MODEL)
        layers = [(layer.name, layer.output_shape[0]) for layer in model.layers if layer.featured]
        ids = [f"item-{i:05d}" for i in range(args.items)]
        labels = [f"class-{i % 10}" for i in range(args.items)]
        client.create_dataset("bench")
        for start in range(0, args.items, 2000):
            index.PutItems(index_pb2.PutItemsRequest(dataset="bench", items=[
                index_pb2.Item(id=i, label=label) for i, label in zip(ids[start:start + 2000],
                                                                       labels[start:start + 2000], strict=True)]))
        raw_s = 0.0
        for number, (layer, dimension) in enumerate(layers):
            # class c's items gather around centre c: a labeled set whose classes the vectors capture
            vectors = clustered_vectors(args.items, dimension, clusters=10, seed=number,
                                        membership=np.arange(args.items) % 10)
            for metric, (space, enum) in METRICS.items():
                name = collection_name(MODEL, layer, "avg", metric)
                index.CreateCollection(index_pb2.CreateCollectionRequest(dataset="bench", spec=index_pb2.CollectionSpec(
                    model=MODEL, layer=layer, pooling=common_pb2.POOLING_AVG, metric=enum, dimension=dimension)))
                for start in range(0, args.items, 2000):
                    index.UpsertVectors(index_pb2.UpsertVectorsRequest(
                        dataset="bench", collection=name, ids=ids[start:start + 2000],
                        vectors=to_tensor(vectors[start:start + 2000])))
                raw = hnswlib.Index(space=space, dim=dimension)
                raw.init_index(max_elements=args.items, M=16, ef_construction=200)
                raw.add_items(vectors, np.arange(args.items))
                raw.set_ef(64)
                started = time.perf_counter()
                for start in range(0, args.items, 256):
                    raw.knn_query(vectors[start:start + 256], k=16)
                raw_s += time.perf_counter() - started
            print(f"indexed {layer} ({dimension}-d) for both metrics", flush=True)
        started = time.perf_counter()
        results = list(client.evaluate("bench", models=[MODEL], metrics=list(METRICS)))[-1].results
        eval_s = time.perf_counter() - started
        best = results[0]
        print(f"evaluate: {len(results)} configurations x {args.items} items in {eval_s:.2f}s "
              f"(raw hnswlib queries {raw_s:.2f}s); best {best.layer} {best.metric} {best.mean_score:.1f}%", flush=True)
    print(json.dumps({"eval_s": round(eval_s, 3), "raw_s": round(raw_s, 3), "ratio": round(eval_s / raw_s, 3),
                      "items": args.items, "configs": len(results)}))


if __name__ == "__main__":
    main()
