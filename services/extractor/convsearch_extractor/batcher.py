"""A dynamic batcher in the manner of Triton's: requests with the same key that arrive within
`max_delay_s` of the oldest waiting one are run together, up to `max_batch` images.

`workers` threads take batches from the one queue and run them in parallel (one on a GPU, one
per CPU of the budget on CPU: see convsearch_extractor.sizing); each batch is formed when a
worker is free to run it, so a busy worker never holds requests back. With several workers a
batch holds at most `max_batch / workers` images (rounded up): `max_batch` is what the workers
take at once together, so a burst of requests, or one large request, spreads over all of them
instead of filling one worker's batch while the others idle. Requests larger than a batch are
split into chunks that queue like any other, and their results are joined again.
"""

import collections
import dataclasses
import queue
import threading
import time
from collections.abc import Callable, Hashable
from concurrent.futures import CancelledError, Future

import numpy as np
import torch

# (N, H, W, 3) uint8 pixels: decoded on the CPU (numpy), or on the model's device (a tensor there).
PixelBatch = np.ndarray | torch.Tensor
RunBatch = Callable[[Hashable, PixelBatch], dict[str, np.ndarray]]


@dataclasses.dataclass(eq=False)  # entries are told apart by identity: equal fields would compare pixels
class _Entry:
    key: Hashable
    pixels: PixelBatch
    future: Future
    arrived: float


class _Joined(Future):
    """The future of several parts: running from the start, so it cannot be cancelled itself
    (its pixels stay in use until every part has run); see cancel_pending."""

    def __init__(self, parts: list[Future]):
        super().__init__()
        self.set_running_or_notify_cancel()
        self.parts = parts


def cancel_pending(future: Future) -> None:
    """Drops the batches of `future` (from submit or gather) that have not started. A joined
    future then ends, with CancelledError, once its running parts have."""
    for part in future.parts if isinstance(future, _Joined) else (future,):
        part.cancel()


def gather(parts: list[Future]) -> Future:
    """A future of the row-wise concatenation of several futures of {name: array}."""
    if len(parts) == 1:
        return parts[0]
    joined = _Joined(parts)
    remaining = [len(parts)]
    lock = threading.Lock()

    def on_done(_part: Future) -> None:
        with lock:
            remaining[0] -= 1
            if remaining[0] or joined.done():
                return
        if cancelled := sum(p.cancelled() for p in parts):
            joined.set_exception(CancelledError(f"{cancelled} of {len(parts)} parts cancelled"))
            return
        errors = [p.exception() for p in parts if p.exception() is not None]
        if errors:
            joined.set_exception(errors[0])
            return
        results = [p.result() for p in parts]
        joined.set_result({name: np.concatenate([r[name] for r in results]) for name in results[0]})

    for part in parts:
        part.add_done_callback(on_done)
    return joined


def _joined(parts: list[PixelBatch]) -> PixelBatch:
    """The parts one after the other: on the device of the device-decoded ones, if any."""
    if all(isinstance(part, np.ndarray) for part in parts):
        return np.concatenate(parts)
    device = next(part.device for part in parts if isinstance(part, torch.Tensor))
    return torch.cat([torch.as_tensor(part).to(device) for part in parts])


class DynamicBatcher:
    """Coalesces concurrent submissions into batches run by `workers` worker threads (and one
    thread that gathers them)."""

    def __init__(self, run_batch: RunBatch, max_batch: int, max_delay_s: float,
                 on_batch: Callable[[int, float], None] = lambda size, wait_s: None, workers: int = 1):
        self._run_batch = run_batch
        self.max_batch = max_batch
        self.max_delay_s = max_delay_s
        self.workers = workers
        self.batch_images = -(-max_batch // workers)
        self._on_batch = on_batch
        self._queue: collections.deque[_Entry] = collections.deque()
        self._cond = threading.Condition()
        self._closed = False
        # A batch is gathered only when a worker is free to run it, by one thread, so two workers
        # never wait on the same oldest request and split it into two small batches. Free workers
        # wait last in, first out: under a light load the same worker, its core's caches warm
        # with the model's weights, runs every batch.
        self._free_workers: queue.LifoQueue[queue.SimpleQueue] = queue.LifoQueue()
        self._threads = [threading.Thread(target=self._work, args=(queue.SimpleQueue(),),
                                          name=f"model-worker-{i}", daemon=True) for i in range(workers)]
        self._threads.append(threading.Thread(target=self._dispatch, name="batcher", daemon=True))
        for thread in self._threads:
            thread.start()

    def submit(self, key: Hashable, pixels: PixelBatch) -> Future:
        """Queues (N, H, W, 3) pixels; the future gives {layer: (N, D)} or the batch's error."""
        now = time.monotonic()
        entries = [_Entry(key, pixels[i:i + self.batch_images], Future(), now)
                   for i in range(0, len(pixels), self.batch_images)]
        with self._cond:
            if self._closed:
                raise RuntimeError("batcher is closed")
            self._queue.extend(entries)
            self._cond.notify()
        return gather([entry.future for entry in entries])

    def resize(self, max_batch: int) -> None:
        """Takes batches of up to `max_batch` images (all workers together) from now on."""
        with self._cond:
            self.max_batch = max_batch
            self.batch_images = -(-max_batch // self.workers)
            self._cond.notify_all()

    def close(self) -> None:
        """Finishes what is queued, then stops the workers."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        for thread in self._threads:
            thread.join()

    def _queued_images(self, key: Hashable) -> int:
        return sum(len(e.pixels) for e in self._queue if e.key == key)

    def _drop_cancelled(self) -> None:
        """Takes the entries whose requests were cancelled out of the queue (and their pixels with them)."""
        if any(e.future.cancelled() for e in self._queue):
            self._queue = collections.deque(e for e in self._queue if not e.future.cancelled())

    def _next_batch(self) -> list[_Entry] | None:
        with self._cond:
            self._drop_cancelled()
            while not self._queue:
                if self._closed:
                    return None
                self._cond.wait()
                self._drop_cancelled()
            oldest = self._queue[0]
            deadline = oldest.arrived + self.max_delay_s
            while (not self._closed and self._queued_images(oldest.key) < self.batch_images
                   and (remaining := deadline - time.monotonic()) > 0):
                self._cond.wait(remaining)
            batch, size = [], 0
            for entry in list(self._queue):
                if entry.key == oldest.key and size + len(entry.pixels) <= self.batch_images:
                    batch.append(entry)
                    size += len(entry.pixels)
            for entry in batch:
                self._queue.remove(entry)
            return batch

    def _dispatch(self) -> None:
        """Waits for a free worker, gathers a batch, hands it to the worker freed last; at the end,
        stops each worker."""
        while True:
            self._free_workers.put(self._free_workers.get())  # until one is free
            batch = self._next_batch()
            worker = self._free_workers.get()  # one freed while the batch gathered comes first
            worker.put(batch)
            if batch is None:
                break
        for _ in range(self.workers - 1):
            self._free_workers.get().put(None)

    def _work(self, inbox: queue.SimpleQueue) -> None:
        while True:
            self._free_workers.put(inbox)
            batch = inbox.get()
            if batch is None:
                return
            self._run(batch)

    def _run(self, batch: list[_Entry]) -> None:
        live = [e for e in batch if e.future.set_running_or_notify_cancel()]
        if not live:
            return
        started = time.monotonic()
        try:
            pixels = live[0].pixels if len(live) == 1 else _joined([e.pixels for e in live])
            outputs = self._run_batch(live[0].key, pixels)
        except Exception as exc:  # noqa: BLE001 - the error belongs to the requests
            for entry in live:
                entry.future.set_exception(exc)
            return
        self._on_batch(len(pixels), started - min(e.arrived for e in live))
        offset = 0
        for entry in live:
            rows = slice(offset, offset + len(entry.pixels))
            entry.future.set_result({name: out[rows] for name, out in outputs.items()})
            offset += len(entry.pixels)
