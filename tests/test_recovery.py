"""The way back from a damaged collection, through the gateway as a user meets it: a corrupt
checkpoint makes that collection answer DATA_LOSS (naming it and the way back) while the rest
serves, and IndexDataset with rebuild_damaged re-embeds it from the dataset's items."""

import json
import pathlib
import sqlite3

import numpy as np
import pytest

from convsearch.cli import FASHION200, read_items
from convsearch.client import Client
from convsearch.embedding import Configuration
from convsearch.errors import DataLoss
from tests.conftest import serve_extractor, serve_gateway, serve_index

pytestmark = pytest.mark.slow
HEAD = Configuration("efficientnet_lite0", ("_conv_head",))
STEM = Configuration("efficientnet_lite0", ("_conv_stem",))
STEM_NAME = "efficientnet_lite0/_conv_stem/avg/cosine"


def collection_dir(data_dir: pathlib.Path, dataset: str, name: str) -> pathlib.Path:
    with sqlite3.connect(data_dir / "records.sqlite") as db:
        (relative,) = db.execute("SELECT directory FROM collections WHERE dataset = ? AND name = ?",
                                 (dataset, name)).fetchone()
    return data_dir / relative


def test_a_damaged_collection_is_refused_then_rebuilt_from_the_items(tmp_path):
    data_dir = tmp_path / "index"
    extractor, extractor_channel, extractor_address = serve_extractor()
    index, index_channel, index_address = serve_index(data_dir)
    gateway, gateway_channel, gateway_address = serve_gateway(extractor_address, index_address)
    client = Client(gateway_address)
    try:
        chosen = [item for item in read_items(FASHION200) if item[1] in ("sandal", "bag", "trouser")][::3]
        for dataset in ("shoes", "spare"):
            client.create_dataset(dataset)
            assert all(r.status == "stored" for r in client.ingest(dataset, chosen, [HEAD, STEM]))
        query = chosen[0][0]
        before = client.search("shoes", item_id=query, configuration=HEAD, k=10)

        index.stop(1.0)  # checkpoints; then a disk flips bytes in one graph file
        damaged = collection_dir(data_dir, "shoes", before.collection)
        checkpoint = damaged / json.loads((damaged / "CURRENT").read_text())["checkpoint"]
        graph = bytearray((checkpoint / "graph.bin").read_bytes())
        for offset in range(1000, len(graph), len(graph) // 60):
            graph[offset] ^= 0xFF
        (checkpoint / "graph.bin").write_bytes(bytes(graph))
        index, index_channel, _ = serve_index(data_dir, port=int(index_address.rsplit(":", 1)[1]))

        with pytest.raises(DataLoss, match=r"efficientnet_lite0/_conv_head/avg/cosine.*'shoes' is damaged.*"
                                           r"graph\.bin.*rebuild"):
            client.search("shoes", item_id=query, configuration=HEAD, k=10)
        with pytest.raises(DataLoss):
            list(client.index("shoes", [HEAD]))
        # Everything else keeps serving.
        assert client.search("shoes", item_id=query, configuration=STEM, k=5).hits
        assert client.search("spare", item_id=query, configuration=HEAD, k=10).hits
        listed = {c.name: c.damage for c in client.dataset("shoes").collections}
        assert "graph.bin" in listed[before.collection] and listed[STEM_NAME] == ""

        last = list(client.index("shoes", [HEAD], rebuild_damaged=True))[-1]
        assert last.finished and last.done == len(chosen) and last.failed == 0
        after = client.search("shoes", item_id=query, configuration=HEAD, k=10)
        assert [h.id for h in after.hits] == [h.id for h in before.hits]
        np.testing.assert_allclose([h.distance for h in after.hits], [h.distance for h in before.hits], atol=1e-5)
        assert after.search_score == before.search_score
        kept = list((data_dir / "damaged").iterdir())
        assert len(kept) == 1 and list(kept[0].glob("ckpt-*/graph.bin"))
    finally:
        client.close()
        for channel, service in ((gateway_channel, gateway), (index_channel, index),
                                 (extractor_channel, extractor)):
            channel.close()
            service.stop(1.0)

