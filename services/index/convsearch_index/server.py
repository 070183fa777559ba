"""Entry point of `convsearch-index`: wires config, core, servicer and server together."""

import logging
import pathlib
import shutil
import threading
import time

from convsearch.allowed_clients import allowed_clients
from convsearch.errors import FailedPrecondition
from convsearch.index.v1 import index_pb2, index_pb2_grpc
from convsearch.logs import setup_logging
from convsearch.observability import RpcObserver, metrics_registry
from convsearch.serving import RunningService, add_health_and_reflection, bind, create_server, tls_credentials, tls_note
from convsearch.stream_cap import stream_cap
from convsearch.tls import TLSError, channel_credentials
from convsearch_index.changes import ChangeLog
from convsearch_index.config import IndexConfig, load_config
from convsearch_index.engine import Index, Limits
from convsearch_index.follower import Follower, FollowerGate
from convsearch_index.metrics import CollectionsCollector, durability_timings
from convsearch_index.roles import claim_role
from convsearch_index.servicer import IndexServicer

COMPACTION_CHECK_S = 1.0  # how often collections are checked for deleted slots to drop, between checkpoints
SERVICE_NAME = index_pb2.DESCRIPTOR.services_by_name["IndexService"].full_name
log = logging.getLogger("convsearch.index")


class _IndexService(RunningService):
    """Serves as soon as the data dir is loaded (a follower: once it holds a copy of its primary);
    checkpoints periodically and on stop."""

    def __init__(self, index: Index, interval_s: float, follower: Follower | None, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.index = index
        self.follower = follower
        self._stopping = threading.Event()
        self._checkpointer = threading.Thread(target=self._checkpoint_every, args=(interval_s,),
                                              name="checkpointer", daemon=True)

    def start(self) -> None:
        super().start()
        self._checkpointer.start()
        if self.follower is None:
            self.set_serving(True)
            return
        if self.follower.ready:  # its copy from before a restart; else its first copy turns it SERVING
            self.set_serving(True)
        self.follower.start()  # after: a whole copy it starts turns it NOT_SERVING until done

    def _checkpoint_every(self, interval_s: float) -> None:
        """Checkpoints every `interval_s`; in between, every COMPACTION_CHECK_S, compacts the
        collections whose deleted slots reached their share."""
        due = time.monotonic() + interval_s
        while not self._stopping.wait(min(COMPACTION_CHECK_S, max(0.0, due - time.monotonic()))):
            try:
                if time.monotonic() >= due:
                    due = time.monotonic() + interval_s
                    self.index.checkpoint()
                else:
                    self.index.compact()
            except Exception:  # noqa: BLE001 - logged; the log still holds every write
                log.exception("periodic checkpoint failed")

    def stop(self, grace_s: float = 5.0) -> None:
        """Stops within about `grace_s`; a primary's writes end first (Index.seal), then its
        followers' streams once they have sent every change, so they resume after the restart."""
        started = time.monotonic()
        self.begin_stop()
        self._stopping.set()
        if self._checkpointer.is_alive():
            self._checkpointer.join()
        if self.follower is not None:
            self.follower.stop()
        else:
            self.index.seal(grace_s)
        super().stop(max(1.0, grace_s - (time.monotonic() - started)))


def build_server(config: IndexConfig) -> tuple[RunningService, int]:
    """Builds the index's server on config.port (0 picks one) and its metrics endpoint on
    config.metrics_port; returns it and its port."""
    credentials = tls_credentials(config.tls_cert, config.tls_key, config.tls_client_ca)  # before opening the data
    try:
        follow_credentials = channel_credentials(config.follow_tls_ca, config.follow_tls_cert, config.follow_tls_key)
    except (TLSError, ValueError) as exc:
        raise SystemExit(f"TLS to the primary: {exc}") from None
    registry = metrics_registry()
    data_dir = pathlib.Path(config.data_dir)
    # A primary logs its changes for followers; a follower applies its primary's and logs none.
    changes = None if config.follow else ChangeLog(config.replication_log_mb << 20)
    try:
        index = Index(data_dir, Limits(config.max_k, config.max_queries, config.exact_below),
                      config.fsync, durability_timings(registry), snapshot_retention=config.snapshot_retention,
                      changes=changes)
    except FailedPrecondition as exc:
        raise SystemExit(str(exc)) from None
    try:
        claim_role(index, config.follow, config.promote)
    except FailedPrecondition as exc:
        index.close()
        raise SystemExit(str(exc)) from None
    shutil.rmtree(data_dir / "replication", ignore_errors=True)  # copies for followers a crash left (data dir held)
    registry.register(CollectionsCollector(index))
    interceptors = [RpcObserver("index", registry), *allowed_clients(config.tls_client_names)]
    follower = None
    if config.follow:
        follower = Follower(index, config.follow, follow_credentials, config.follow_tls_server_name,
                            config.max_message_mb, config.max_lag_wait, registry,
                            on_ready=lambda: service.set_serving(True), on_syncing=lambda: service.set_serving(False))
        interceptors.append(FollowerGate(follower, SERVICE_NAME))
    server = create_server(config.rpc_workers, config.max_message_mb, interceptors, config.server_options(),
                           stream_cap(config.max_streams, config.rpc_workers))
    index_pb2_grpc.add_IndexServiceServicer_to_server(IndexServicer(index), server)
    health = add_health_and_reflection(server, [SERVICE_NAME])
    try:
        port = bind(server, config.host, config.port, credentials)
        service = _IndexService(index, config.checkpoint_interval_s, follower, server, health, [SERVICE_NAME], log,
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
    log.info("index listening on %s:%d%s (data dir %s, checkpoint every %.0fs, metrics port %d)%s", config.host, port,
             tls_note(config.tls_cert, config.tls_client_ca), config.data_dir, config.checkpoint_interval_s,
             service.metrics_port, f", following {config.follow} (read-only)" if config.follow else "")
    service.run_until_signalled(config.grace_s)


if __name__ == "__main__":
    main()
