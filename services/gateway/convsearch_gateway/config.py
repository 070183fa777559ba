"""The gateway's configuration, from flags and CONVSEARCH_GATEWAY_* environment variables."""

import dataclasses

from convsearch.config import check_address, check_port, check_positive, option, parse_config
from convsearch.image_limits import DEFAULT_MAX_PIXELS
from convsearch.logs import LOG_FORMATS, check_log_format
from convsearch.placement import parse_primaries
from convsearch.serving import ConnectionAgeOptions
from convsearch.tls import ServerTLSOptions, check_server_options, peer_tls_options
from convsearch_gateway.evaluation import EXACT_UP_TO


@dataclasses.dataclass(frozen=True)
class GatewayConfig(ServerTLSOptions, ConnectionAgeOptions,
                    peer_tls_options("backend", "the extractor and index", "the extractor's and index's",
                                     "their addresses")):
    """Everything the gateway process can be told. The connection age limit matters behind a
    load balancer of connections (a Kubernetes Service): clients that keep one channel open
    reconnect, and so reach the gateways the autoscaler added."""

    host: str = option("0.0.0.0", "interface to listen on")
    port: int = option(50051, "gRPC port; 0 picks a free one")
    metrics_port: int = option(9051, "Prometheus /metrics port; 0 picks a free one, -1 disables")
    log_format: str = option("text", f"log lines as {' or '.join(LOG_FORMATS)} (JSON: one object a line)")
    extractor: str = option("127.0.0.1:50052", "extractor address: host:port, several comma-separated "
                                               "IPv4 host:port, or one dns:///name (balanced round_robin)")
    index: str = option("127.0.0.1:50053", "index primary: host:port or dns:///name; or several primaries, "
                                           "comma-separated host:port, each dataset placed on one by its name "
                                           "(name each by a stable host name, e.g. index-0.index:50053, and "
                                           "the same way everywhere; see `convsearch rebalance`)")
    index_replicas: str = option("", "followers of the (one) index primary (convsearch-index --follow): host:port, "
                                     "several comma-separated IPv4 host:port, or dns:///name (balanced "
                                     "round_robin); searches and other reads go there, seeing this gateway's own "
                                     "writes; writes, image reads and reads no follower answers in time go to the "
                                     "primary; empty: every call to the primary")
    deadline_s: float = option(30.0, "deadline of each call to a backend (a client's shorter deadline wins)")
    max_concurrent_rpcs: int = option(64, "RPCs served at once; more wait")
    batch_size: int = option(32, "images per extractor batch when ingesting and indexing")
    evaluate_exact_up_to: int = option(EXACT_UP_TO, "Evaluate ranks by exact search (a brute force's order: "
                                                    "float64 distances, ties by item id) in datasets of up to this "
                                                    "many items, through the graph above (its cost grows far more "
                                                    "slowly; ties may rank by insertion order); 0: always the graph")
    health_interval_s: float = option(1.0, "seconds between health checks of the backends")
    max_message_mb: int = option(64, "largest gRPC message received or sent, in MiB")
    grace_s: float = option(10.0, "seconds in-flight RPCs get to finish on SIGTERM")
    max_pixels: int = option(DEFAULT_MAX_PIXELS, "largest image accepted, in pixels, checked on its header before "
                                                 "any decode (decompression bombs); match the extractor's --max-pixels")
    api_keys: str = option("", "file of API keys (one `sha256:<hex> <role> [datasets]` a line; see the README), "
                               "re-read when it changes; empty: no authentication, anyone may do anything")
    rate_limit_per_s: float = option(0.0, "requests a second per API key (per client address without keys); "
                                          "0: unlimited")
    rate_burst: int = option(0, "requests a key may make at once beyond the rate; 0: one second's worth")
    max_streams_per_key: int = option(0, "streaming RPCs one API key (client address without keys) may have open; "
                                         "0: half of max_concurrent_streams, so one key cannot take every slot "
                                         "(set it to max_concurrent_streams for no cap of its own)")
    max_concurrent_streams: int = option(0, "streaming RPCs served at once, fewer than max_concurrent_rpcs so unary "
                                            "calls and health always have a worker; more are refused at once; "
                                            "0: half of max_concurrent_rpcs")
    stream_idle_timeout_s: float = option(30.0, "a client stream that sends nothing this long is ended with "
                                                "DEADLINE_EXCEEDED; a stream whose response waits this long "
                                                "for the client to read it is cancelled")

    @property
    def stream_cap(self) -> int:
        """Streaming RPCs served at once: max_concurrent_streams, or half the workers."""
        return self.max_concurrent_streams or max(1, self.max_concurrent_rpcs // 2)

    def validate(self) -> None:
        """Raises ValueError for values the service cannot run with."""
        for part in self.extractor.split(","):
            check_address(part.strip(), "extractor")
        for primary in parse_primaries(self.index):
            check_address(primary, "index")
        for part in filter(None, (part.strip() for part in self.index_replicas.split(","))):
            check_address(part, "index_replicas")
        if self.index_replicas and len(parse_primaries(self.index)) > 1:
            raise ValueError("index_replicas follow one primary: with several index primaries, leave it empty")
        for name in ("deadline_s", "max_concurrent_rpcs", "batch_size", "health_interval_s", "max_message_mb"):
            check_positive(getattr(self, name), name)
        check_positive(self.max_pixels, "max_pixels")
        if self.evaluate_exact_up_to < 0:
            raise ValueError(f"evaluate_exact_up_to must be 0 (always the graph) or more, "
                             f"got {self.evaluate_exact_up_to}")
        check_port(self.port, "port")
        check_port(self.metrics_port, "metrics_port", disabled_ok=True)
        check_log_format(self.log_format)
        check_server_options(self.tls_cert, self.tls_key, self.tls_client_ca)
        self.check_backend_tls()
        check_positive(self.stream_idle_timeout_s, "stream_idle_timeout_s")
        self.check_connection_age()
        for name in ("rate_limit_per_s", "rate_burst", "max_streams_per_key", "max_concurrent_streams"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be 0 or more, got {getattr(self, name)}")
        if self.max_concurrent_rpcs > 1 and self.stream_cap >= self.max_concurrent_rpcs:
            raise ValueError(f"max_concurrent_streams ({self.stream_cap}) must be below max_concurrent_rpcs "
                             f"({self.max_concurrent_rpcs}), so unary calls and health always have a worker")


def load_config(argv=None) -> GatewayConfig:
    """Parses flags and environment; exits with a usage message on a bad value."""
    return parse_config(GatewayConfig, "convsearch-gateway", "CONVSEARCH_GATEWAY", argv,
                        "The ConvNet Search API: datasets, ingestion, indexing and image search, over gRPC.")
