"""The web service's configuration, from flags and CONVSEARCH_WEB_* environment variables."""

import dataclasses

from convsearch.config import check_address, check_port, check_positive, option, parse_config
from convsearch.logs import LOG_FORMATS, check_log_format
from convsearch.tls import check_client_options
from convsearch_web.security import check_allowed_hosts


@dataclasses.dataclass(frozen=True)
class WebConfig:
    """Everything the web process can be told."""

    host: str = option("0.0.0.0", "interface to listen on")
    port: int = option(8080, "HTTP port; 0 picks a free one")
    gateway: str = option("127.0.0.1:50051", "the gateway's address (host:port or dns:///name)")
    api_key: str = option("", "API key sent to the gateway (the page acts with its rights); "
                              "empty: CONVSEARCH_API_KEY, else none")
    tls_ca: str = option("", "PEM CA the gateway's certificate is verified against: TLS to the gateway; "
                             "empty: CONVSEARCH_TLS_CA, else plaintext")
    tls_cert: str = option("", "PEM client certificate for a gateway with mutual TLS (empty: CONVSEARCH_TLS_CERT)")
    tls_key: str = option("", "PEM private key of tls_cert (empty: CONVSEARCH_TLS_KEY)")
    timeout_s: float = option(120.0, "deadline of each call to the gateway, in seconds")
    max_upload_mb: float = option(10.0, "largest image a person may upload to search with, in MiB")
    allowed_hosts: str = option("", "host names (comma-separated; * for any) the page is reached as, besides "
                                    "localhost, 127.0.0.1 and [::1]: other Host headers are refused")
    log_format: str = option("text", f"log lines as {' or '.join(LOG_FORMATS)}")

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)

    def validate(self) -> None:
        """Raises ValueError for values the service cannot run with."""
        check_address(self.gateway, "gateway")
        check_port(self.port, "port")
        check_positive(self.timeout_s, "timeout_s")
        check_positive(self.max_upload_mb, "max_upload_mb")
        check_log_format(self.log_format)
        check_allowed_hosts(self.allowed_hosts)
        check_client_options(self.tls_ca, self.tls_cert, self.tls_key)


def load_config(argv=None) -> WebConfig:
    """Parses flags and environment; exits with a usage message on a bad value."""
    return parse_config(WebConfig, "convsearch-web", "CONVSEARCH_WEB", argv,
                        "The ConvNet Search web page: explore datasets, models, layers and metrics in a browser.")
