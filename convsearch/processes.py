"""Running service processes (tests, benchmarks, `convsearch up`): free ports, start, wait, stop."""

import os
import socket
import subprocess
import sys
import tempfile
import time

from convsearch.channels import create_channel
from convsearch.health import wait_until_serving


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _log_of(process: subprocess.Popen) -> str:
    process.log_file.seek(0)
    return process.log_file.read()


def start_service(command: str, *args: str, service: str = "", timeout_s: float = 120.0, env=None,
                  port: int | None = None, host: str = "127.0.0.1"):
    """Starts `command args` (an installed console script) on `port` (default: a free one), its
    log in a temporary file, and waits until `service` is SERVING. Returns (process, address);
    stop it with `stop_service`. Raises RuntimeError with its log if it exits or stays unhealthy."""
    port = port or free_port()
    log_file = tempfile.TemporaryFile("w+")
    # Metrics on a free port unless told otherwise, so services started side by side never collide.
    metrics = {f"CONVSEARCH_{service}_METRICS_PORT": "0" for service in ("EXTRACTOR", "INDEX", "GATEWAY")}
    process = subprocess.Popen(
        [os.path.join(os.path.dirname(sys.executable), command), "--host", host, "--port", str(port), *args],
        stdout=log_file, stderr=subprocess.STDOUT, text=True, env={**metrics, **os.environ, **(env or {})})
    process.log_file = log_file
    address = f"127.0.0.1:{port}"
    channel = create_channel(address)
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            try:
                wait_until_serving(channel, service, 0.5)
                return process, address
            except TimeoutError:
                if process.poll() is not None or time.monotonic() > deadline:
                    process.kill()
                    process.wait()
                    raise RuntimeError(f"{command} did not become healthy:\n{_log_of(process)}") from None
    finally:
        channel.close()


def stop_service(process: subprocess.Popen, timeout_s: float = 30.0) -> str:
    """SIGTERM, wait, return everything it logged."""
    process.terminate()
    process.wait(timeout=timeout_s)
    return _log_of(process)
