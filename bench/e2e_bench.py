"""End to end through the gateway: ingest+index images/s, and search latency p50/p99 for image
queries and id queries, against calling the extractor and the index directly in the same run
(the gateway's overhead). Then IndexDataset of the stored images at the model's featured layers
(index_img_s: fetch, embed, upsert into every collection) against the same images and layers
embedded through the extractor's BulkEmbed directly (embed_img_s), and their quotient
(index_ratio: 1.0 when the gateway's fetching and upserting cost the extractor no time).

Last stdout line: one JSON object (ingest_img_s, search_p50_ms, search_p99_ms, direct_p50_ms,
overhead_p50_ms, ..., index_img_s, embed_img_s, index_ratio).
"""

import argparse
import json
import tempfile
import time

import numpy as np

from convsearch.channels import create_channel
from convsearch.cli import FASHION200, read_items
from convsearch.client import Client
from convsearch.embedding import Configuration
from convsearch.extractor.v1 import extractor_pb2, extractor_pb2_grpc
from convsearch.index.v1 import index_pb2, index_pb2_grpc
from convsearch.local import LocalStack

MODEL = "efficientnet_lite0"
LAYER = "_conv_head"
COLLECTION = f"{MODEL}/{LAYER}/avg/cosine"


def latencies_ms(run, queries) -> np.ndarray:
    run(queries[0])
    out = []
    for query in queries:
        started = time.perf_counter()
        run(query)
        out.append(1000 * (time.perf_counter() - started))
    return np.array(out)


def embed_directly(extractor, images: list[bytes], layers: list[str], batch: int = 32) -> int:
    """Streams the images through BulkEmbed at these layers; how many came back embedded."""
    def requests():
        yield extractor_pb2.BulkEmbedRequest(config=extractor_pb2.EmbedConfig(model=MODEL, layers=layers))
        for start in range(0, len(images), batch):
            yield extractor_pb2.BulkEmbedRequest(images=[extractor_pb2.ImageInput(id=str(n), data=images[n])
                                                         for n in range(start, min(start + batch, len(images)))])
    return sum(answer.WhichOneof("result") != "error" for answer in extractor.BulkEmbed(requests()))


def index_against_embed(client: Client, extractor, items: list) -> dict:
    """IndexDataset at the model's featured layers against BulkEmbed of the same images and layers."""
    layers = [layer.name for model in client.models() if model.name == MODEL for layer in model.layers
              if layer.featured]
    client.create_dataset("layers")
    list(client.ingest("layers", items))  # stored only: indexed below
    images = [item[2] for item in items]
    embed_directly(extractor, images[:8], layers)  # warm-up
    started = time.perf_counter()
    embedded = embed_directly(extractor, images, layers)
    embed_img_s = embedded / (time.perf_counter() - started)
    started = time.perf_counter()
    *_, last = client.index("layers", [Configuration(MODEL, tuple(layers))])
    index_img_s = (last.done - last.failed) / (time.perf_counter() - started)
    print(f"{len(layers)} layers: IndexDataset {index_img_s:.1f} img/s, BulkEmbed directly {embed_img_s:.1f} "
          f"img/s, ratio {index_img_s / embed_img_s:.3f}", flush=True)
    return {"index_layers": len(layers), "index_img_s": round(index_img_s, 2), "embed_img_s": round(embed_img_s, 2),
            "index_ratio": round(index_img_s / embed_img_s, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--id-queries", type=int, default=400)
    parser.add_argument("--image-queries", type=int, default=60)
    args = parser.parse_args()
    items = list(read_items(FASHION200))
    config = Configuration("efficientnet_lite0", (LAYER,))
    with tempfile.TemporaryDirectory() as data_dir, LocalStack(data_dir) as stack, Client(stack.gateway) as client:
        client.create_dataset("bench")
        started = time.perf_counter()
        stored = sum(result.status == "stored" for result in client.ingest("bench", items))
        list(client.index("bench", [config]))
        ingest_img_s = stored / (time.perf_counter() - started)
        print(f"ingest + index {stored} images at {LAYER}: {ingest_img_s:.1f} img/s", flush=True)

        extractor = extractor_pb2_grpc.ExtractorServiceStub(create_channel(stack.extractor))
        index = index_pb2_grpc.IndexServiceStub(create_channel(stack.index))
        ids = [item[0] for item in items] * (1 + args.id_queries // len(items))
        ids = ids[:args.id_queries]
        images = [item[2] for item in items][:args.image_queries]

        def gateway_id(item_id):
            client.search("bench", item_id=item_id, configuration=config, k=15)

        def direct_id(item_id):  # the gateway's calls, made by the client itself
            reply = index.Search(index_pb2.SearchRequest(dataset="bench", collection=COLLECTION, query_ids=[item_id],
                                                         k=15))
            index.GetItems(index_pb2.GetItemsRequest(dataset="bench", ids=[item_id, *reply.results[0].ids]))

        def gateway_image(image):
            client.search("bench", image=image, configuration=config, k=15)

        def direct_image(image):
            embedded = extractor.Embed(extractor_pb2.EmbedRequest(
                config=extractor_pb2.EmbedConfig(model="efficientnet_lite0", layers=[LAYER]), images=[image]))
            reply = index.Search(index_pb2.SearchRequest(dataset="bench", collection=COLLECTION,
                                                         queries=embedded.layers[0].vectors, k=15))
            index.GetItems(index_pb2.GetItemsRequest(dataset="bench", ids=reply.results[0].ids))

        results = {}
        for name, run, queries in (("id", gateway_id, ids), ("direct_id", direct_id, ids),
                                   ("image", gateway_image, images), ("direct_image", direct_image, images)):
            results[name] = latencies_ms(run, queries)
            print(f"{name:13} p50 {np.percentile(results[name], 50):7.2f} ms  "
                  f"p99 {np.percentile(results[name], 99):7.2f} ms", flush=True)
        indexing = index_against_embed(client, extractor, items)
    p50 = {name: float(np.percentile(values, 50)) for name, values in results.items()}
    print(json.dumps({
        "ingest_img_s": round(ingest_img_s, 2),
        "search_p50_ms": round(p50["id"], 3), "search_p99_ms": round(float(np.percentile(results["id"], 99)), 3),
        "image_search_p50_ms": round(p50["image"], 3),
        "image_search_p99_ms": round(float(np.percentile(results["image"], 99)), 3),
        "direct_p50_ms": round(p50["direct_id"], 3), "direct_image_p50_ms": round(p50["direct_image"], 3),
        "overhead_p50_ms": round(p50["id"] - p50["direct_id"], 3),
        "image_overhead_p50_ms": round(p50["image"] - p50["direct_image"], 3),
        **indexing,
    }))


if __name__ == "__main__":
    main()
