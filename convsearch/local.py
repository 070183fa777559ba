"""The three services as child processes on this machine, and the web page with them: `convsearch
up`, the demo and tests."""

import os
import pathlib
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

from convsearch.extractor.v1 import extractor_pb2
from convsearch.gateway.v1 import gateway_pb2
from convsearch.index.v1 import index_pb2
from convsearch.processes import free_port, start_service, stop_service

EXTRACTOR = extractor_pb2.DESCRIPTOR.services_by_name["ExtractorService"].full_name
INDEX = index_pb2.DESCRIPTOR.services_by_name["IndexService"].full_name
GATEWAY = gateway_pb2.DESCRIPTOR.services_by_name["GatewayService"].full_name

LOCAL_UNUSED = ("CONVSEARCH_API_KEY", "CONVSEARCH_TLS_CA", "CONVSEARCH_TLS_CERT", "CONVSEARCH_TLS_KEY")


def start_web(gateway: str, port: int | None = None, host: str = "127.0.0.1", timeout_s: float = 60.0):
    """Starts `convsearch-web` for the gateway at `gateway` on `port` (default: a free one) and
    waits until it answers ready. Returns (process, URL); stop it with `stop_service`. Raises
    RuntimeError with its log if it exits or stays unready."""
    port = port or free_port()
    log_file = tempfile.TemporaryFile("w+")
    # The local gateway is plaintext without keys: a user's TLS or key variables are for others.
    env = {name: value for name, value in os.environ.items() if name not in LOCAL_UNUSED}
    process = subprocess.Popen(
        [os.path.join(os.path.dirname(sys.executable), "convsearch-web"), "--host", host, "--port", str(port),
         "--gateway", gateway], stdout=log_file, stderr=subprocess.STDOUT, text=True, env=env)
    process.log_file = log_file
    url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '') else host}:{port}/"
    deadline = time.monotonic() + timeout_s
    while process.poll() is None and time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url + "readyz", timeout=2.0):
                return process, url
        except (urllib.error.URLError, OSError):
            time.sleep(0.2)
    if process.poll() is None:
        process.kill()
    process.wait()
    log_file.seek(0)
    raise RuntimeError(f"convsearch-web did not become ready:\n{log_file.read()}")


class LocalStack:
    """Extractor, index (data in data_dir/index) and gateway, started in that order and healthy;
    with `web`, the web page too, its address in `web_url`.

    Ports of None pick free ones. Stops in reverse order; usable as a context manager."""

    def __init__(self, data_dir: pathlib.Path, gateway_port: int | None = None, extractor_port: int | None = None,
                 index_port: int | None = None, extractor_args: tuple[str, ...] = (), host: str = "127.0.0.1",
                 web: bool = False, web_port: int | None = None):
        self.processes = {}
        self.web_url = ""
        self.index_dir = pathlib.Path(data_dir) / "index"
        try:
            self.processes["extractor"], self.extractor = start_service(
                "convsearch-extractor", "--metrics-port", "-1", *extractor_args, service=EXTRACTOR,
                port=extractor_port, host=host)
            self.processes["index"], self.index = start_service(
                "convsearch-index", "--data-dir", str(self.index_dir), service=INDEX,
                port=index_port, host=host)
            self.processes["gateway"], self.gateway = start_service(
                "convsearch-gateway", "--extractor", self.extractor, "--index", self.index, service=GATEWAY,
                port=gateway_port, host=host)
            if web:
                self.processes["web"], self.web_url = start_web(self.gateway, web_port, host)
        except BaseException:
            self.stop()
            raise

    def exited(self) -> list[str]:
        """The services that have exited on their own, by name."""
        return [name for name, process in self.processes.items() if process.poll() is not None]

    def stop(self) -> dict[str, str]:
        """Stops every service still running; returns their logs by name."""
        logs = {}
        for name in reversed(list(self.processes)):
            logs[name] = stop_service(self.processes.pop(name))
        return logs

    def __enter__(self) -> "LocalStack":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
