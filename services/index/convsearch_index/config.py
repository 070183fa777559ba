"""The index's configuration, from flags and CONVSEARCH_INDEX_* environment variables."""

import dataclasses

from convsearch import stream_cap
from convsearch.allowed_clients import ClientNamesOption
from convsearch.config import check_address, check_port, check_positive, option, parse_config
from convsearch.logs import LOG_FORMATS, check_log_format
from convsearch.serving import ConnectionAgeOptions
from convsearch.tls import ServerTLSOptions, check_server_options, peer_tls_options


@dataclasses.dataclass(frozen=True)
class IndexConfig(ServerTLSOptions, ClientNamesOption, ConnectionAgeOptions,
                  peer_tls_options("follow", "the primary", "the primary's", "--follow")):
    """Everything the index process can be told. The connection age limit matters for followers:
    gateways reading through dns:/// reconnect and reach followers the autoscaler added."""

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
    max_streams: int = option(0, stream_cap.HELP)
    grace_s: float = option(10.0, "seconds in-flight RPCs get to finish on SIGTERM")
    snapshot_retention: int = option(0, "snapshots kept per dataset: after each snapshot the oldest beyond this "
                                        "many are deleted; 0 keeps all")
    replication_log_mb: int = option(256, "MiB of recent changes a primary keeps for its followers; a follower "
                                          "further behind (or new) copies everything (the changes made "
                                          "meanwhile kept, up to 4x this)")
    follow: str = option("", "run as a read-only follower of the primary index at this host:port: copy its data, "
                             "apply its changes, serve reads; empty: a primary")
    promote: bool = option(False, "start a follower's data dir as a primary for good (its primary is gone); "
                                  "without it a follower's copy refuses to start without --follow")
    max_lag_wait: float = option(2.0, "seconds a follower's read with a min_version it has not applied waits "
                                      "before answering UNAVAILABLE (read from the primary)")

    def validate(self) -> None:
        """Raises ValueError for values the service cannot run with."""
        for name in ("checkpoint_interval_s", "max_k", "max_queries", "max_message_mb", "rpc_workers",
                     "replication_log_mb"):
            check_positive(getattr(self, name), name)
        if self.max_streams < 0:
            raise ValueError(f"max_streams must be 0 (sized from rpc_workers) or more, got {self.max_streams}")
        if self.snapshot_retention < 0:
            raise ValueError(f"snapshot_retention must be 0 (keep all) or more, got {self.snapshot_retention}")
        check_port(self.port, "port")
        check_port(self.metrics_port, "metrics_port", disabled_ok=True)
        check_log_format(self.log_format)
        check_server_options(self.tls_cert, self.tls_key, self.tls_client_ca)
        self.check_client_names()
        if self.follow:
            check_address(self.follow, "follow")
        self.check_follow_tls()
        if self.promote and self.follow:
            raise ValueError("promote makes a follower's copy a primary: it cannot go with follow")
        if self.max_lag_wait < 0:
            raise ValueError(f"max_lag_wait must be 0 or more seconds, got {self.max_lag_wait}")
        self.check_connection_age()


def load_config(argv=None) -> IndexConfig:
    """Parses flags and environment; exits with a usage message on a bad value."""
    return parse_config(IndexConfig, "convsearch-index", "CONVSEARCH_INDEX", argv,
                        "Durable datasets, items and hnswlib vector collections, over gRPC.")
