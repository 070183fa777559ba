"""A dynamic batcher in the manner of Triton's: requests with the same key that arrive within
`max_delay_s` of the oldest waiting one are run together, up to `max_batch` images.

One worker thread owns the device; requests larger than `max_batch` are split into chunks
that queue like any other, and their results are joined again.
"""

import collections
import dataclasses
import threading
import time
from collections.abc import Callable, Hashable
from concurrent.futures import Future

import numpy as np

RunBatch = Callable[[Hashable, np.ndarray], dict[str, np.ndarray]]


@dataclasses.dataclass
class _Entry:
    key: Hashable
    pixels: np.ndarray
    future: Future
    arrived: float


def gather(parts: list[Future]) -> Future:
    """A future of the row-wise concatenation of several futures of {name: array}."""
    if len(parts) == 1:
        return parts[0]
    joined: Future = Future()
    remaining = [len(parts)]
    lock = threading.Lock()

    def on_done(_part: Future) -> None:
        with lock:
            remaining[0] -= 1
            if remaining[0] or joined.done():
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


class DynamicBatcher:
    """Coalesces concurrent submissions into batches run by one worker thread."""

    def __init__(self, run_batch: RunBatch, max_batch: int, max_delay_s: float,
                 on_batch: Callable[[int, float], None] = lambda size, wait_s: None):
        self._run_batch = run_batch
        self.max_batch = max_batch
        self.max_delay_s = max_delay_s
        self._on_batch = on_batch
        self._queue: collections.deque[_Entry] = collections.deque()
        self._cond = threading.Condition()
        self._closed = False
        self._worker = threading.Thread(target=self._loop, name="batcher", daemon=True)
        self._worker.start()

    def submit(self, key: Hashable, pixels: np.ndarray) -> Future:
        """Queues (N, H, W, 3) pixels; the future gives {layer: (N, D)} or the batch's error."""
        now = time.monotonic()
        entries = [_Entry(key, pixels[i:i + self.max_batch], Future(), now)
                   for i in range(0, len(pixels), self.max_batch)]
        with self._cond:
            if self._closed:
                raise RuntimeError("batcher is closed")
            self._queue.extend(entries)
            self._cond.notify()
        return gather([entry.future for entry in entries])

    def close(self) -> None:
        """Finishes what is queued, then stops the worker."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._worker.join()

    def _queued_images(self, key: Hashable) -> int:
        return sum(len(e.pixels) for e in self._queue if e.key == key)

    def _next_batch(self) -> list[_Entry] | None:
        with self._cond:
            while not self._queue:
                if self._closed:
                    return None
                self._cond.wait()
            oldest = self._queue[0]
            deadline = oldest.arrived + self.max_delay_s
            while (not self._closed and self._queued_images(oldest.key) < self.max_batch
                   and (remaining := deadline - time.monotonic()) > 0):
                self._cond.wait(remaining)
            batch, size = [], 0
            for entry in list(self._queue):
                if entry.key == oldest.key and size + len(entry.pixels) <= self.max_batch:
                    batch.append(entry)
                    size += len(entry.pixels)
            for entry in batch:
                self._queue.remove(entry)
            return batch

    def _loop(self) -> None:
        while (batch := self._next_batch()) is not None:
            live = [e for e in batch if e.future.set_running_or_notify_cancel()]
            if not live:
                continue
            started = time.monotonic()
            try:
                pixels = live[0].pixels if len(live) == 1 else np.concatenate([e.pixels for e in live])
                outputs = self._run_batch(live[0].key, pixels)
            except Exception as exc:  # noqa: BLE001 - the error belongs to the requests
                for entry in live:
                    entry.future.set_exception(exc)
                continue
            self._on_batch(len(pixels), started - min(e.arrived for e in live))
            offset = 0
            for entry in live:
                rows = slice(offset, offset + len(entry.pixels))
                entry.future.set_result({name: out[rows] for name, out in outputs.items()})
                offset += len(entry.pixels)
