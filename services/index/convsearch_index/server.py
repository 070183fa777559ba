"""Entry point of `convsearch-index`: wires config, core, servicer and server together."""

import logging
import pathlib
import threading

from convsearch.errors import FailedPrecondition
from convsearch.index.v1 import index_pb2, index_pb2_grpc
from convsearch.logs import setup_logging
from convsearch.observability import RpcObserver, metrics_registry
from convsearch.serving import RunningService, add_health_and_reflection, bind, create_server, tls_credentials, tls_note
from convsearch_index.config import IndexConfig, load_config
from convsearch_index.engine import Index, Limits
from convsearch_index.metrics import CollectionsCollector, durability_timings
from convsearch_index.servicer import IndexServicer

SERVICE_NAME = index_pb2.DESCRIPTOR.services_by_name["IndexService"].full_name
log = logging.getLogger("convsearch.index")


class _IndexService(RunningService):
    """Serves as soon as the data dir is loaded; checkpoints periodically and on stop."""

    def __init__(self, index: Index, interval_s: float, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.index = index
        self._stopping = threading.Event()
        self._checkpointer = threading.Thread(target=self._checkpoint_every, args=(interval_s,),
                                              name="checkpointer", daemon=True)

    def start(self) -> None:
        super().start()
        self._checkpointer.start()
        self.set_serving(True)

    def _checkpoint_every(self, interval_s: float) -> None:
        while not self._stopping.wait(interval_s):
            try:
                self.index.checkpoint()
            except Exception:  # noqa: BLE001 - logged; the log still holds every write
                log.exception("periodic checkpoint failed")

    def stop(self, grace_s: float = 5.0) -> None:
        self.begin_stop()
        self._stopping.set()
        if self._checkpointer.is_alive():
            self._checkpointer.join()
        super().stop(grace_s)


def build_server(config: IndexConfig) -> tuple[RunningService, int]:
    """Builds the index's server on config.port (0 picks one) and its metrics endpoint on
    config.metrics_port; returns it and its port."""
    credentials = tls_credentials(config.tls_cert, config.tls_key, config.tls_client_ca)  # before opening the data
    registry = metrics_registry()
    try:
        index = Index(pathlib.Path(config.data_dir), Limits(config.max_k, config.max_queries, config.exact_below),
                      config.fsync, durability_timings(registry), snapshot_retention=config.snapshot_retention)
    except FailedPrecondition as exc:
        raise SystemExit(str(exc)) from None
    registry.register(CollectionsCollector(index))
    server = create_server(config.rpc_workers, config.max_message_mb, [RpcObserver("index", registry)])
    index_pb2_grpc.add_IndexServiceServicer_to_server(IndexServicer(index), server)
    health = add_health_and_reflection(server, [SERVICE_NAME])
    try:
        port = bind(server, config.host, config.port, credentials)
        service = _IndexService(index, config.checkpoint_interval_s, server, health, [SERVICE_NAME], log,
                                on_stop=index.close, metrics_registry=registry, metrics_port=config.metrics_port,
                                metrics_host=config.host)
    except SystemExit:
        index.close()
        raise
    return service, port


def main(argv=None) -> None:
    """Runs the index until SIGTERM or SIGINT, then checkpoints."""
    config = load_config(argv)
    setup_logging("convsearch.index", config.log_format)
    service, port = build_server(config)
    service.start()
    log.info("index listening on %s:%d%s (data dir %s, checkpoint every %.0fs, metrics port %d)", config.host, port,
             tls_note(config.tls_cert, config.tls_client_ca), config.data_dir, config.checkpoint_interval_s,
             service.metrics_port)
    service.run_until_signalled(config.grace_s)


if __name__ == "__main__":
    main()
