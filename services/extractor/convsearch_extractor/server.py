"""Entry point of `convsearch-extractor`: wires config, core, servicer and server together."""

import logging
import pathlib
import threading

from convsearch.allowed_clients import allowed_clients
from convsearch.cpu_budget import cpu_budget
from convsearch.extractor.v1 import extractor_pb2, extractor_pb2_grpc
from convsearch.logs import setup_logging
from convsearch.observability import RpcObserver, metrics_registry
from convsearch.serving import (
    MIB,
    RunningService,
    add_health_and_reflection,
    bind,
    create_server,
    tls_credentials,
    tls_note,
)
from convsearch.stream_cap import stream_cap
from convsearch_extractor.catalog import load_catalog
from convsearch_extractor.config import ExtractorConfig, load_config
from convsearch_extractor.device_decode import device_decoder
from convsearch_extractor.engine import Extractor, Limits
from convsearch_extractor.runtime import ModelPool
from convsearch_extractor.servicer import ExtractorServicer
from convsearch_extractor.sizing import apply_torch_threads, pool_sizes

SERVICE_NAME = extractor_pb2.DESCRIPTOR.services_by_name["ExtractorService"].full_name
log = logging.getLogger("convsearch.extractor")


def build_server(config: ExtractorConfig) -> tuple[RunningService, int]:
    """Builds the extractor's server on config.port (0 picks one) and its metrics endpoint on
    config.metrics_port; returns it and its port.

    Health is NOT_SERVING until `start()` has loaded and run the default model.
    """
    credentials = tls_credentials(config.tls_cert, config.tls_key, config.tls_client_ca)  # before any model work
    catalog = load_catalog(pathlib.Path(config.weights_dir))
    if config.default_model not in catalog:
        raise SystemExit(f"default model {config.default_model!r} is unknown; "
                         f"known models: {', '.join(catalog)}")
    sizes = pool_sizes(config, cpu_budget(), config.torch_device())
    apply_torch_threads(sizes)
    log.info("%s", sizes.describe())
    pool = ModelPool(catalog, config.torch_device(), config.memory_budget_mb * MIB, config.allow_random_weights,
                     config.compile, config.max_activation_bytes())
    limits = Limits(max_images=config.max_images, max_pixels=config.max_pixels,
                    max_flatten=config.max_flatten, max_response_bytes=config.max_message_mb * MIB)
    extractor = Extractor(pool, limits, sizes.max_batch, config.max_queue_delay_ms / 1000.0,
                          sizes.decode_workers, config.default_model, sizes.decode_processes, sizes.model_workers,
                          choose_batch=config.max_batch == -1 and config.torch_device().type == "cuda",
                          decode_arena_bytes=config.decode_arena_mb * MIB)
    try:  # after the decode processes are forked: this starts CUDA
        extractor.device_decoder = device_decoder(config.decode_device, config.torch_device())
    except ValueError as exc:
        extractor.close()
        raise SystemExit(str(exc)) from None
    log.info("JPEGs decoded on %s", extractor.device_decoder.device if extractor.device_decoder else "the CPU")
    extractor.metrics.cpu_budget.set(sizes.budget.cpus)
    for name, size in sizes.gauges().items():
        extractor.metrics.pool_size.labels(name).set(size)
    registry = metrics_registry(extractor.metrics.registry)
    interceptors = [RpcObserver("extractor", registry), *allowed_clients(config.tls_client_names)]
    server = create_server(sizes.rpc_workers, config.max_message_mb, interceptors,
                           config.server_options(), stream_cap(config.max_streams, sizes.rpc_workers))
    extractor_pb2_grpc.add_ExtractorServiceServicer_to_server(ExtractorServicer(extractor), server)
    health = add_health_and_reflection(server, [SERVICE_NAME])
    port = bind(server, config.host, config.port, credentials)
    service = _ExtractorService(extractor, server, health, [SERVICE_NAME], log,
                                on_stop=extractor.close, metrics_registry=registry,
                                metrics_port=config.metrics_port, metrics_host=config.host)
    extractor.on_decoder_lost = service.fail
    return service, port


class _ExtractorService(RunningService):
    """Starts serving once the default model has been loaded and run once."""

    def __init__(self, extractor: Extractor, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.extractor = extractor
        self._stopping = threading.Event()
        self._warm_thread = threading.Thread(target=self._warm_up, name="warm-up", daemon=True)

    def start(self) -> None:
        super().start()
        self._warm_thread.start()

    def stop(self, grace_s: float = 5.0) -> None:
        self._stopping.set()
        self.begin_stop()
        # Native torch code must not be running in a thread when the interpreter exits.
        if self._warm_thread.is_alive():
            self._warm_thread.join()
        super().stop(grace_s)

    def _warm_up(self) -> None:
        try:
            seconds = self.extractor.warm_up()
        except Exception:  # noqa: BLE001 - logged; health stays NOT_SERVING
            log.exception("default model %s could not be loaded; staying NOT_SERVING",
                          self.extractor.default_model)
            return
        if self._stopping.is_set():
            return
        self.set_serving(True)
        log.info("default model %s ready in %.1fs%s; SERVING", self.extractor.default_model, seconds,
                 " (compiled)" if self.extractor.pool.compile else "")
        for name in self.extractor.pool.catalog:  # so the first ListModels is fast
            if self._stopping.is_set():
                return
            self.extractor.pool.graph(name)
            self.extractor.pool.weights(name)


def main(argv=None) -> None:
    """Runs the extractor until SIGTERM or SIGINT."""
    config = load_config(argv)
    setup_logging("convsearch.extractor", config.log_format)
    service, port = build_server(config)
    service.start()
    log.info("extractor listening on %s:%d%s (device %s, queue delay %.1f ms, "
             "metrics port %d, max connection age %gs)", config.host, port,
             tls_note(config.tls_cert, config.tls_client_ca), config.torch_device(),
             config.max_queue_delay_ms, service.metrics_port, config.max_connection_age_s)
    service.run_until_signalled(config.grace_s)
    if service.failed:
        raise SystemExit(f"convsearch-extractor: {service.failed}")


if __name__ == "__main__":
    main()
