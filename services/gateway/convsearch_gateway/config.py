"""The gateway's configuration, from flags and CONVSEARCH_GATEWAY_* environment variables."""

import dataclasses

from convsearch.config import check_address, check_port, check_positive, option, parse_config
from convsearch.logs import LOG_FORMATS, check_log_format


@dataclasses.dataclass(frozen=True)
class GatewayConfig:
    """Everything the gateway process can be told."""

    host: str = option("0.0.0.0", "interface to listen on")
    port: int = option(50051, "gRPC port; 0 picks a free one")
    metrics_port: int = option(9051, "Prometheus /metrics port; 0 picks a free one, -1 disables")
    log_format: str = option("text", f"log lines as {' or '.join(LOG_FORMATS)} (JSON: one object a line)")
    extractor: str = option("127.0.0.1:50052", "extractor address: host:port, several comma-separated "
                                               "IPv4 host:port, or one dns:///name (balanced round_robin)")
    index: str = option("127.0.0.1:50053", "index address (host:port or dns:///name)")
    deadline_s: float = option(30.0, "deadline of each call to a backend (a client's shorter deadline wins)")
    max_concurrent_rpcs: int = option(64, "RPCs served at once; more wait")
    batch_size: int = option(32, "images per extractor batch when ingesting and indexing")
    health_interval_s: float = option(1.0, "seconds between health checks of the backends")
    max_message_mb: int = option(64, "largest gRPC message received or sent, in MiB")
    grace_s: float = option(10.0, "seconds in-flight RPCs get to finish on SIGTERM")

    def validate(self) -> None:
        """Raises ValueError for values the service cannot run with."""
        for part in self.extractor.split(","):
            check_address(part.strip(), "extractor")
        check_address(self.index, "index")
        for name in ("deadline_s", "max_concurrent_rpcs", "batch_size", "health_interval_s", "max_message_mb"):
            check_positive(getattr(self, name), name)
        check_port(self.port, "port")
        check_port(self.metrics_port, "metrics_port", disabled_ok=True)
        check_log_format(self.log_format)


def load_config(argv=None) -> GatewayConfig:
    """Parses flags and environment; exits with a usage message on a bad value."""
    return parse_config(GatewayConfig, "convsearch-gateway", "CONVSEARCH_GATEWAY", argv,
                        "The ConvNet Search API: datasets, ingestion, indexing and image search, over gRPC.")
