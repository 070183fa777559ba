"""The three services as child processes on this machine: `convsearch up`, the demo and tests."""

import pathlib

from convsearch.extractor.v1 import extractor_pb2
from convsearch.gateway.v1 import gateway_pb2
from convsearch.index.v1 import index_pb2
from convsearch.processes import start_service, stop_service

EXTRACTOR = extractor_pb2.DESCRIPTOR.services_by_name["ExtractorService"].full_name
INDEX = index_pb2.DESCRIPTOR.services_by_name["IndexService"].full_name
GATEWAY = gateway_pb2.DESCRIPTOR.services_by_name["GatewayService"].full_name


class LocalStack:
    """Extractor, index (data in data_dir/index) and gateway, started in that order and healthy.

    Ports of None pick free ones. Stops in reverse order; usable as a context manager."""

    def __init__(self, data_dir: pathlib.Path, gateway_port: int | None = None, extractor_port: int | None = None,
                 index_port: int | None = None, extractor_args: tuple[str, ...] = (), host: str = "127.0.0.1"):
        self.processes = {}
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
