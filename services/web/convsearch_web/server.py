"""Entry point of `convsearch-web`: the page and its JSON API on uvicorn, talking to the gateway."""

import logging
import socket
import sys

import uvicorn

from convsearch.logs import setup_logging
from convsearch.tls import TLSError
from convsearch_web.app import create_app
from convsearch_web.config import WebConfig, load_config

log = logging.getLogger("convsearch.web")


def listen(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (0: a free port); exits with a message when it is taken."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise SystemExit(f"convsearch-web: cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def serve(config: WebConfig) -> None:
    """Serves until SIGINT or SIGTERM (uvicorn finishes the requests in flight)."""
    try:
        app = create_app(config)
    except (TLSError, ValueError, RuntimeError) as exc:
        raise SystemExit(f"convsearch-web: {exc}") from None
    sock = listen(config.host, config.port)
    port = sock.getsockname()[1]
    shown = "127.0.0.1" if config.host in ("0.0.0.0", "") else config.host
    log.info("serving the page on http://%s:%d/ (gateway %s)", shown, port, config.gateway)
    server = uvicorn.Server(uvicorn.Config(app, log_config=None, access_log=False, timeout_graceful_shutdown=10))
    server.run(sockets=[sock])


def main(argv=None) -> int:
    config = load_config(argv)
    setup_logging("web", config.log_format)
    serve(config)
    return 0


if __name__ == "__main__":
    sys.exit(main())
