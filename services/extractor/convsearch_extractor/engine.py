"""The extractor's proto-free core: validates requests, decodes images in a worker pool (JPEGs
on the model's device, with a device decoder) and feeds the dynamic batcher, so decoding the
next chunk overlaps the forward pass of this one.
"""

import collections
import dataclasses
import itertools
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool

import numpy as np
import prometheus_client as prom
import torch

from convsearch.errors import Cancelled, InvalidArgument, ResourceExhausted, Unavailable, shown
from convsearch_extractor import device_decode, host_decode, imaging
from convsearch_extractor.batcher import DynamicBatcher, PixelBatch, cancel_pending, gather
from convsearch_extractor.runtime import POOLINGS, EmbedSpec, LoadedModel, ModelPool, padded_size

BATCH_CHOICES = (32, 64, 128, 256)  # a model worker's batch sizes tried at warm-up on CUDA
Alive = Callable[[], bool]
MIB = 1 << 20
_LAYER_FRAMING = 256  # bytes of a layer's framing in an answer (its name, shape, tags), at most
log = logging.getLogger("convsearch.extractor")


@dataclasses.dataclass(frozen=True)
class Limits:
    """Request limits; each one breached gets a clear error, never a crash."""

    max_images: int = 256
    max_pixels: int = 40_000_000
    max_flatten: int = 100_000
    max_response_bytes: int = 64 << 20


class Metrics:
    """Prometheus metrics of one extractor, in a registry of its own."""

    def __init__(self):
        self.registry = prom.CollectorRegistry()
        self.batch_size = prom.Histogram(
            "convsearch_extractor_batch_size", "Images per forward pass",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=self.registry)
        self.queue_wait = prom.Histogram(
            "convsearch_extractor_queue_wait_seconds", "Time the oldest image of a batch waited",
            registry=self.registry)
        self.images = prom.Counter(
            "convsearch_extractor_images", "Images embedded", registry=self.registry)
        self.image_errors = prom.Counter(
            "convsearch_extractor_image_errors", "Images refused as unusable", registry=self.registry)
        self.device_decoded = prom.Counter(
            "convsearch_extractor_device_decoded_images", "Images decoded on the model's device (nvJPEG)",
            registry=self.registry)
        self.device_decode_refused = prom.Counter(
            "convsearch_extractor_device_decode_refused_batches", "Batches of JPEGs the device decoder "
            "refused (a JPEG corrupt past its header, or out of memory), decoded on the CPU instead",
            registry=self.registry)
        self.cpu_budget = prom.Gauge(
            "convsearch_extractor_cpu_budget", "Whole CPUs the process may use (cgroup quota and "
            "affinity, whichever is smaller), which its pools are sized from", registry=self.registry)
        self.max_batch = prom.Gauge(
            "convsearch_extractor_max_batch", "Most images the model workers take at once (on CUDA "
            "chosen at warm-up)", registry=self.registry)
        self.warm_up_seconds = prom.Gauge(
            "convsearch_extractor_warm_up_seconds", "Seconds the default model took to load and run once "
            "per batch shape (with --compile: to compile)", registry=self.registry)
        self.pool_size = prom.Gauge(
            "convsearch_extractor_pool_size", "Size of each pool: model_workers, torch_threads, "
            "interop_threads, decode_workers, decode_processes, rpc_workers", ["pool"], registry=self.registry)

    def record_batch(self, size: int, wait_s: float) -> None:
        self.batch_size.observe(size)
        self.queue_wait.observe(wait_s)
        self.images.inc(size)


ImageResult = dict[str, np.ndarray] | imaging.ImageError


def _device_batches(sizes: list[int], step: int) -> Iterator[list[int]]:
    """The indices of the images with pixels in `sizes` (0: not for the device decoder), in
    batches of at most `step` images and device_decode.BATCH_PIXELS pixels (at least one image)."""
    batch, pixels = [], 0
    for i, size in enumerate(sizes):
        if not size:
            continue
        if batch and (len(batch) == step or pixels + size > device_decode.BATCH_PIXELS):
            yield batch
            batch, pixels = [], 0
        batch.append(i)
        pixels += size
    if batch:
        yield batch


def _chunked(indices: list[int], step: int) -> collections.deque[list[int]]:
    """`indices` in chunks of at most `step`, in order."""
    return collections.deque(indices[first:first + step] for first in range(0, len(indices), step))


def _always() -> bool:
    return True


def _check(alive: Alive) -> None:
    if not alive():
        raise Cancelled("the client cancelled the call or its deadline passed; the work for it was stopped")


def _wait_all(futures: list[Future], alive: Alive) -> None:
    """Waits until every future is done; raises the first batch error, or Cancelled once the
    client is gone."""
    while futures:
        done, pending = wait(futures, host_decode.ALIVE_POLL_S, FIRST_EXCEPTION)
        for future in done:
            future.result()
        futures = list(pending)
        if futures:
            _check(alive)


def _futures(items: list[tuple]) -> list[Future]:
    return [second for _, second in items if isinstance(second, Future)]


def _submitted(chunks: Iterator[tuple], alive: Alive) -> list[tuple]:
    """Every item of `chunks`, once the batches of them all have run. When anything fails or
    the client goes, the batches not yet run are dropped."""
    items = []
    try:
        items.extend(chunks)
        _wait_all(_futures(items), alive)
    except BaseException:
        for future in _futures(items):
            cancel_pending(future)
        raise
    return items


class Extractor:
    """Embeds images: validation, decoding pool, dynamic batching, one forward per batch, run by
    `model_workers` threads in parallel."""

    def __init__(self, pool: ModelPool, limits: Limits, max_batch: int, max_delay_s: float,
                 decode_workers: int, default_model: str, decode_processes: int = 0, model_workers: int = 1,
                 choose_batch: bool = False, decode_arena_bytes: int = host_decode.ARENA_MB << 20):
        self.pool = pool
        self.choose_batch = choose_batch
        # JPEGs decoded on the model's device; set once the decode processes are forked (CUDA after).
        self.device_decoder: device_decode.DeviceDecoder | None = None
        self.limits = limits
        self.default_model = default_model
        self.metrics = Metrics()
        self._decoder = host_decode.PixelDecoder(decode_processes, decode_workers, decode_arena_bytes)
        # Told when a decode process died: the pool of processes cannot be used again.
        self.on_decoder_lost: Callable[[str], None] = lambda reason: None
        # Stream jobs wait on decodes, so they get threads of their own.
        self._jobs = ThreadPoolExecutor(decode_workers, thread_name_prefix="stream-job")
        self._batcher = DynamicBatcher(self._run_batch, max_batch, max_delay_s,
                                       self.metrics.record_batch, model_workers)
        self.metrics.max_batch.set(max_batch)

    def _run_batch(self, spec: EmbedSpec, pixels: PixelBatch) -> dict[str, np.ndarray]:
        return self.pool.acquire(spec.model).embed(pixels, spec)

    def resolve(self, model: str, layers: Iterable[str], pooling: str, normalize: bool
                ) -> tuple[EmbedSpec, dict[str, int]]:
        """Fills defaults and validates a request: (spec, vector dimension per layer).

        Raises NotFound (model), FailedPrecondition (weights), InvalidArgument (layers, pooling).
        """
        model = model or self.default_model
        self.pool.spec(model)
        if pooling not in POOLINGS:
            raise InvalidArgument(f"unknown pooling {pooling!r}; use one of {', '.join(POOLINGS)}")
        layers = tuple(layers) or (self.pool.graph(model).featured[-1],)
        repeated = [layer for layer, count in collections.Counter(layers).items() if count > 1]
        if repeated:  # named alone: a list of a model's every layer would be cut before the advice
            raise InvalidArgument(f"layers name {shown(repeated[0])} twice; name each once")
        spec = EmbedSpec(model, layers, pooling, normalize)
        dims = self.pool.check_layers(spec, self.limits.max_flatten)
        self.pool.acquire(model)
        return spec, dims

    def check_count(self, count: int, what: str, hint: str = "split it or use BulkEmbed") -> None:
        """RESOURCE_EXHAUSTED when a request carries too many images; INVALID_ARGUMENT for none."""
        if count == 0:
            raise InvalidArgument(f"{what} has no images; send at least one")
        if count > self.limits.max_images:
            raise ResourceExhausted(f"{what} has {count} images, over the limit of {self.limits.max_images}; {hint}")

    def check_answer(self, dims: dict[str, int], images: int, what: str, hint: str) -> None:
        """RESOURCE_EXHAUSTED when the vectors of `images` images at these layers would make a
        message over the limit."""
        size = images * (sum(dims.values()) * 4 + _LAYER_FRAMING * len(dims))
        if size > self.limits.max_response_bytes:
            raise ResourceExhausted(f"{what} would be {size / MIB:.2f} MiB, over the message limit of "
                                    f"{self.limits.max_response_bytes / MIB:g} MiB; {hint}")

    def _embed_chunks(self, spec: EmbedSpec, images: list[bytes], first_index: int, strict: bool, alive: Alive
                      ) -> Iterator[tuple[list[int], Future] | tuple[int, imaging.ImageError]]:
        """Decodes and hands each chunk of at most a batch to the batcher as soon as it is
        decoded: yields (indices, future of their vectors), and, unless `strict`, (index, error)
        for bad images. In strict mode a bad image raises. With a device decoder, the JPEGs it
        takes are decoded there, a batch at a time, while the pool decodes the rest, two chunks
        at a time (the next one decodes while this one runs). Once the client is gone (`alive`
        false), it raises Cancelled before starting or handing on another chunk."""
        preprocess = self.pool.spec(spec.model).preprocess
        step = min(self._batcher.max_batch, self._decoder.chunk_images(preprocess))
        sizes = [device_decode.device_pixels(data, self.limits.max_pixels) if self.device_decoder else 0
                 for data in images]
        waiting = _chunked([i for i, size in enumerate(sizes) if not size], step)
        decoding: collections.deque[tuple[list[int], host_decode.Chunk]] = collections.deque()
        try:
            self._start_chunks(waiting, decoding, images, preprocess, alive)
            for indices in _device_batches(sizes, self._batcher.max_batch):
                _check(alive)
                try:
                    pixels = self._decode_on_device([images[i] for i in indices], preprocess)
                except RuntimeError as exc:  # a JPEG corrupt past its header: the CPU decoder says which, and why
                    if isinstance(exc, torch.OutOfMemoryError):
                        log.warning("decoding %d JPEGs on %s ran out of memory; decoding them on the CPU",
                                    len(indices), self.device_decoder.device)
                    self.metrics.device_decode_refused.inc()
                    waiting = _chunked(sorted([*itertools.chain.from_iterable(waiting), *indices]), step)  # in order
                    continue
                yield indices, self._batcher.submit(spec, pixels)
            while waiting or decoding:
                _check(alive)
                self._start_chunks(waiting, decoding, images, preprocess, alive)
                indices, chunk = decoding.popleft()
                try:
                    pixels, good, errors = chunk.result()
                except BaseException:
                    chunk.release()
                    raise
                if errors:  # the good rows were copied out: the chunk's own rows are free now
                    chunk.release()
                for position, error in errors:
                    self.metrics.image_errors.inc()
                    if strict:
                        raise InvalidArgument(f"image {first_index + indices[position]} {error}") from None
                    yield first_index + indices[position], error
                if good:
                    yield [indices[i] for i in good], self._submit_chunk(spec, pixels, None if errors else chunk)
        except BrokenProcessPool as exc:
            reason = f"a decode process died ({exc})"
            self.on_decoder_lost(reason)
            raise Unavailable(f"{reason}: this extractor cannot decode any more and is being restarted; retry "
                              "(another replica answers meanwhile)", reason="DECODER_LOST") from None
        finally:
            for _, chunk in decoding:
                chunk.cancel()
                chunk.release()

    def _submit_chunk(self, spec: EmbedSpec, pixels: np.ndarray, chunk: host_decode.Chunk | None) -> Future:
        """Hands decoded pixels to the batcher; they are `chunk`'s rows, if given, until the batch has run."""
        try:
            future = self._batcher.submit(spec, pixels)
        except BaseException:
            if chunk is not None:
                chunk.release()
            raise
        if chunk is not None:
            future.add_done_callback(chunk.release)
        return future

    def _start_chunks(self, waiting: collections.deque, decoding: collections.deque, images: list[bytes],
                      preprocess: imaging.Preprocess, alive: Alive) -> None:
        """Starts decoding waiting chunks until two are decoding; waits for room in the decoder's
        arena only while none is (so the chunks holding it are all on their way to the batcher)
        and the client is there (Cancelled once it is not)."""
        while waiting and len(decoding) < 2:
            chunk = self._decoder.decode([images[i] for i in waiting[0]], preprocess, self.limits.max_pixels,
                                         wait=not decoding, alive=alive)
            if chunk is None:  # the arena is full: a chunk is decoding, or the wait ended with the client
                _check(alive)
                return
            decoding.append((waiting.popleft(), chunk))

    def _decode_on_device(self, images: list[bytes], preprocess: imaging.Preprocess) -> torch.Tensor:
        pixels = self.device_decoder.decode(images, preprocess)
        self.metrics.device_decoded.inc(len(images))
        return pixels

    def embed(self, spec: EmbedSpec, dims: dict[str, int], images: list[bytes], alive: Alive = _always
              ) -> dict[str, np.ndarray]:
        """{layer: (N, D)} for every image; any bad image raises InvalidArgument naming its index.
        Once the client is gone (`alive` false) the work stops and Cancelled is raised."""
        self.check_count(len(images), "the request")
        self.check_answer(dims, len(images), "the answer", "send fewer images or use BulkEmbed")
        chunks = _submitted(self._embed_chunks(spec, images, 0, True, alive), alive)
        vectors = gather([future for _, future in chunks]).result()
        order = [i for indices, _ in chunks for i in indices]
        if order == sorted(order):
            return vectors
        rows = np.argsort(order)  # device-decoded chunks came first: back to the images' order
        return {layer: values[rows] for layer, values in vectors.items()}

    def embed_each(self, spec: EmbedSpec, images: list[bytes], first_index: int, alive: Alive = _always
                   ) -> Future:
        """Starts embedding images independently; the future gives one ImageResult per image,
        or Cancelled once the client is gone (`alive` false)."""
        self.check_count(len(images), f"the stream message holding image {first_index}",
                         f"send at most {self.limits.max_images} images a message")
        return self._jobs.submit(self._embed_each, spec, images, first_index, alive)

    def _embed_each(self, spec: EmbedSpec, images: list[bytes], first_index: int, alive: Alive
                    ) -> list[ImageResult]:
        results: list[ImageResult | None] = [None] * len(images)
        pending = []
        for first, second in _submitted(self._embed_chunks(spec, images, first_index, False, alive), alive):
            if isinstance(second, imaging.ImageError):
                results[first - first_index] = second
            else:
                pending.append((first, second))
        for indices, future in pending:
            outputs = future.result()
            for row, i in enumerate(indices):
                results[i] = {layer: vectors[row] for layer, vectors in outputs.items()}
        return results

    def warm_up(self) -> float:
        """Loads the default model, chooses the batch size (with `choose_batch`), and runs it once
        per padded batch size it will see (once on CPU); returns the seconds it took."""
        started = time.monotonic()
        spec, _ = self.resolve(self.default_model, (), "avg", False)
        size = self.pool.spec(spec.model).preprocess.crop_size
        loaded = self.pool.acquire(spec.model)
        if self.choose_batch:
            self._batcher.resize(self._batcher.workers * self._fastest_batch(loaded, spec, size))
            self.metrics.max_batch.set(self._batcher.max_batch)
        counts = {1}
        if loaded.pad_batches:
            counts |= {padded_size(n) for n in range(1, self._batcher.batch_images + 1)}
        for count in sorted(counts):
            self._batcher.submit(spec, np.zeros((count, size, size, 3), np.uint8)).result()
        seconds = time.monotonic() - started
        self.metrics.warm_up_seconds.set(seconds)
        return seconds

    @staticmethod
    def _fastest_batch(loaded: LoadedModel, spec: EmbedSpec, size: int) -> int:
        """The smallest of BATCH_CHOICES whose forward passes run within 5% of the fastest's
        images/s (a larger batch only adds latency); sizes that run out of memory are left out."""
        rates: dict[int, float] = {}
        for batch in BATCH_CHOICES:
            pixels = np.zeros((batch, size, size, 3), np.uint8)
            try:
                loaded.embed(pixels, spec)  # kernels chosen (or compiled) for this shape
                started = time.perf_counter()
                for _ in range(3):
                    loaded.embed(pixels, spec)
            except torch.OutOfMemoryError:
                torch.cuda.empty_cache()
                break
            rates[batch] = 3 * batch / (time.perf_counter() - started)
        if not rates:
            log.warning("%s ran out of memory at a batch of %d; keeping it", spec.model, BATCH_CHOICES[0])
            return BATCH_CHOICES[0]
        chosen = min(batch for batch, rate in rates.items() if rate >= 0.95 * max(rates.values()))
        log.info("batch of %d a model worker chosen for %s (images/s by batch: %s)", chosen, spec.model,
                 ", ".join(f"{batch}: {rate:.0f}" for batch, rate in rates.items()))
        return chosen

    def close(self) -> None:
        """Finishes queued work and stops the worker threads."""
        self._jobs.shutdown(wait=True, cancel_futures=True)
        self._batcher.close()
        self._decoder.shutdown()
