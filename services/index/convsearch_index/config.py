"""The index's configuration, from flags and CONVSEARCH_INDEX_* environment variables."""

import dataclasses

from convsearch.config import check_port, check_positive, option, parse_config
from convsearch.logs import LOG_FORMATS, check_log_format
from convsearch.tls import ServerTLSOptions, check_server_options


@dataclasses.dataclass(frozen=True)
class IndexConfig(ServerTLSOptions):
    """Everything the index process can be told."""

    host: str = option("0.0.0.0", "interface to listen on")
    port: int = option(50053, "gRPC port; 0 picks a free one")
    metrics_port: int = option(9053, "Prometheus /metrics port; 0 picks a free one, -1 disables")
    log_format: str = option("text", f"log lines as {' or '.join(LOG_FORMATS)} (JSON: one object a line)")
    data_dir: str = option("./data/index", "where datasets, items, vectors and snapshots live")
    checkpoint_interval_s: float = option(60.0, "seconds between checkpoints of collections with new writes")
    fsync: bool = option(True, "fsync every write before answering (turn off only for throwaway data)")
    max_k: int = option(1000, "largest k a search may ask for")
    max_queries: int = option(4096, "most query vectors in one search")
    exact_below: int = option(2000, "filtered searches with fewer candidates than this run exactly")
    max_message_mb: int = option(64, "largest gRPC message received or sent, in MiB")
    rpc_workers: int = option(32, "threads serving RPCs")
    grace_s: float = option(10.0, "seconds in-flight RPCs get to finish on SIGTERM")
    snapshot_retention: int = option(0, "snapshots kept per dataset: after each snapshot the oldest beyond this "
                                        "many are deleted; 0 keeps all")

    def validate(self) -> None:
        """Raises ValueError for values the service cannot run with."""
        for name in ("checkpoint_interval_s", "max_k", "max_queries", "max_message_mb", "rpc_workers"):
            check_positive(getattr(self, name), name)
        if self.snapshot_retention < 0:
            raise ValueError(f"snapshot_retention must be 0 (keep all) or more, got {self.snapshot_retention}")
        check_port(self.port, "port")
        check_port(self.metrics_port, "metrics_port", disabled_ok=True)
        check_log_format(self.log_format)
        check_server_options(self.tls_cert, self.tls_key, self.tls_client_ca)


def load_config(argv=None) -> IndexConfig:
    """Parses flags and environment; exits with a usage message on a bad value."""
    return parse_config(IndexConfig, "convsearch-index", "CONVSEARCH_INDEX", argv,
                        "Durable datasets, items and hnswlib vector collections, over gRPC.")
