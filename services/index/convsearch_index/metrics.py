"""The index's own Prometheus metrics: write-ahead log append and checkpoint timings, and each
collection's vector counts and damage, read from the live collections at every scrape."""

import prometheus_client as prom
from prometheus_client.core import GaugeMetricFamily

from convsearch_index.collection import Timings
from convsearch_index.engine import Index

_APPEND_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
_CHECKPOINT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


def durability_timings(registry: prom.CollectorRegistry) -> Timings:
    """Timings that observe convsearch_index_wal_append_seconds (one batch written and fsync'd)
    and convsearch_index_checkpoint_seconds (one checkpoint written, compaction included)."""
    append = prom.Histogram("convsearch_index_wal_append_seconds",
                            "Time to append one batch to a collection's write-ahead log, fsync included",
                            registry=registry, buckets=_APPEND_BUCKETS)
    checkpoint = prom.Histogram("convsearch_index_checkpoint_seconds", "Time to write one collection's checkpoint",
                                registry=registry, buckets=_CHECKPOINT_BUCKETS)
    return Timings(log_append=append.observe, checkpoint=checkpoint.observe)


class CollectionsCollector:
    """Per collection (labels dataset, collection): convsearch_index_collection_vectors (live
    vectors), convsearch_index_collection_deleted_vectors (slots deleted and not yet compacted
    away) and convsearch_index_collection_damaged (1 when its files failed their checks; a
    damaged collection has no vector counts)."""

    def __init__(self, index: Index):
        self.index = index

    def describe(self):
        return []  # the series depend on the collections there are at each scrape

    def collect(self):
        labels = ("dataset", "collection")
        vectors = GaugeMetricFamily("convsearch_index_collection_vectors", "Vectors in the collection", labels=labels)
        deleted = GaugeMetricFamily("convsearch_index_collection_deleted_vectors",
                                    "Deleted slots the collection still holds (until a checkpoint compacts it)",
                                    labels=labels)
        damaged = GaugeMetricFamily("convsearch_index_collection_damaged",
                                    "1 when the collection's files failed their checks (it answers DATA_LOSS)",
                                    labels=labels)
        for info in self.index.all_collections():
            names = (info.dataset, info.key.name)
            damaged.add_metric(names, 0 if info.vectors is not None else 1)
            if info.vectors is not None:
                stats = info.vectors.stats()
                vectors.add_metric(names, stats["count"])
                deleted.add_metric(names, stats["deleted"])
        yield from (vectors, deleted, damaged)
