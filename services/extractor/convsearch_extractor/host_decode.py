"""Decoding pools that write each image's pixels straight into its row of the batch.

With threads, a chunk's batch is a numpy array the threads fill. With processes, it is a range
of a shared-memory arena mapped before the processes fork: the images' bytes are copied in after
the rows, each process decodes its share of the chunk into its rows, and only the errors travel
back. A chunk without bad images is handed to the model as it lies (a view of its rows), so no
image, encoded or decoded, is pickled, piped or stacked.

A chunk's range is freed once its batch has run (`Chunk.release`) and its decoding is over; a
chunk that finds the arena full waits for another's to be freed.
"""

import bisect
import collections
import gc
import itertools
import mmap
import multiprocessing
import threading
from collections.abc import Callable
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor

import numpy as np

from convsearch_extractor import imaging

ALIVE_POLL_S = 0.25  # how often a request waiting for room, or on its batches, asks whether its client is there
_ALIGN = 64  # every range of the arena starts on a cache line
ARENA_MB = 256  # the default arena: 2 batches of 256 images at 224x224 and room to spare
MIN_ARENA_MB = 16  # a quarter holds several images of any model's input (456x456 at most)
_ARENAS: dict[int, mmap.mmap] = {}  # by number, inherited by the decode processes at their fork
_ARENA_NUMBERS = itertools.count()


def decode_rows(rows: np.ndarray, images: list[bytes], preprocess: imaging.Preprocess, max_pixels: int
                ) -> list[imaging.ImageError | None]:
    """Decodes `images` into `rows` (one (crop, crop, 3) uint8 row each); the error of each image
    that cannot be used, None for the others."""
    errors = []
    for row, data in zip(rows, images, strict=True):
        try:
            row[...] = imaging.decode(data, preprocess, max_pixels)
            errors.append(None)
        except imaging.ImageError as exc:
            errors.append(exc)
        except Exception as exc:  # noqa: BLE001 - a decoder's defect fails its image, never its request
            errors.append(imaging.ImageError(f"could not be decoded ({imaging.describe(exc)}); send it in "
                                             "another format"))
    return errors


def _decode_in_arena(arena: int, offset: int, images: list[bytes] | list[tuple[int, int]],
                     preprocess: imaging.Preprocess, max_pixels: int) -> list[imaging.ImageError | None]:
    """decode_rows into the rows at byte `offset` of arena number `arena` (runs in a decode process);
    an image is its bytes, or the (start, length) of its bytes in the arena."""
    memory = _ARENAS[arena]
    images = [memory[image[0]:image[0] + image[1]] if isinstance(image, tuple) else image for image in images]
    return decode_rows(_rows(memory, offset, len(images), preprocess.crop_size), images, preprocess, max_pixels)


def _rows(buffer, offset: int, count: int, size: int) -> np.ndarray:
    return np.frombuffer(buffer, np.uint8, count * size * size * 3, offset).reshape(count, size, size, 3)


class _Arena:
    """Byte ranges of a shared mapping, first fit (the low ranges are reused, so the pages a light
    load touches stay few), waited for in turn when none is free."""

    def __init__(self, size: int):
        self.size = size
        self.memory = mmap.mmap(-1, size)  # shared and anonymous: the processes forked later see it
        self._free = [(0, size)]  # (start, length), sorted, never adjacent
        self._waiting: collections.deque[object] = collections.deque()  # first come, first served
        self._cond = threading.Condition()

    def take(self, length: int, wait: bool, alive: Callable[[], bool] | None = None) -> int | None:
        """The start of a free range of `length` bytes. Without `wait`, None when there is none
        or others wait; with it, waits for its turn (a large range is not starved by small ones),
        or, given `alive`, until alive() is false (then None)."""
        if length > self.size:
            raise ValueError(f"{length} bytes asked of an arena of {self.size}")
        with self._cond:
            if not self._waiting and (start := self._first_fit(length)) is not None:
                return start
            if not wait:
                return None
            turn = object()
            self._waiting.append(turn)
            try:
                while self._waiting[0] is not turn or (start := self._first_fit(length)) is None:
                    if alive is not None and not alive():
                        return None
                    self._cond.wait(None if alive is None else ALIVE_POLL_S)
                return start
            finally:
                self._waiting.remove(turn)
                self._cond.notify_all()

    def _first_fit(self, length: int) -> int | None:
        for i, (start, free) in enumerate(self._free):
            if free >= length:
                if free == length:
                    del self._free[i]
                else:
                    self._free[i] = (start + length, free - length)
                return start
        return None

    def give(self, start: int, length: int) -> None:
        with self._cond:
            i = bisect.bisect(self._free, (start, 0))
            if i < len(self._free) and self._free[i][0] == start + length:  # joins the range after
                length += self._free.pop(i)[1]
            if i and sum(self._free[i - 1]) == start:  # and the one before
                start, before = self._free.pop(i - 1)
                length += before
                i -= 1
            self._free.insert(i, (start, length))
            self._cond.notify_all()


class Chunk:
    """A chunk of images being decoded into a batch of its own."""

    def __init__(self, rows: np.ndarray, parts: list[tuple[int, Future]], on_free=None):
        self._rows = rows
        self._parts = parts  # (first row, future of that part's errors)
        self._on_free = on_free
        self._holders = 1 + len(parts)  # the parts' decoding, and the caller until it releases
        self._lock = threading.Lock()
        for _, future in parts:
            future.add_done_callback(self._let_go)

    def result(self) -> tuple[np.ndarray, list[int], list[tuple[int, imaging.ImageError]]]:
        """Waits for the decoding: (pixels of the good images, their positions in the chunk, and
        (position, error) of each bad one). Without bad images the pixels are the chunk's rows."""
        errors = []
        for first, future in self._parts:
            errors.extend((first + i, error) for i, error in enumerate(future.result()) if error is not None)
        if not errors:
            return self._rows, list(range(len(self._rows))), []
        bad = {i for i, _ in errors}
        good = [i for i in range(len(self._rows)) if i not in bad]
        return self._rows[good], good, errors

    def cancel(self) -> None:
        """Drops the parts not started yet."""
        for _, future in self._parts:
            future.cancel()

    def release(self, _done: object = None) -> None:
        """The caller is done with the pixels: the rows are freed once decoding is over too."""
        self._let_go()

    def _let_go(self, _future: object = None) -> None:
        with self._lock:
            self._holders -= 1
            if self._holders or self._on_free is None:
                return
        self._on_free()


class PixelDecoder:
    """`processes` decoding processes (free of the GIL) writing into a shared arena of
    `arena_bytes`, or, with none, `threads` threads writing into numpy arrays.

    Processes are forked at once, before the caller starts gRPC threads or uses CUDA, so each
    starts as a light copy that only ever decodes, and stays one: it shares the caller's memory
    instead of copying it page by page.
    """

    def __init__(self, processes: int, threads: int, arena_bytes: int = ARENA_MB << 20):
        self.processes = max(0, processes)
        self.workers = self.processes or threads
        self._arena: _Arena | None = None
        if not self.processes:
            self._pool: Executor = ThreadPoolExecutor(threads, thread_name_prefix="decode")
            return
        self._arena = _Arena(arena_bytes)
        self._arena_number = next(_ARENA_NUMBERS)
        _ARENAS[self._arena_number] = self._arena.memory
        self._pool = ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("fork"))
        # Frozen while they fork, the objects alive now are never traversed by the processes'
        # collector, so the pages holding them stay shared instead of being copied into each.
        frozen_before = gc.get_freeze_count()
        gc.freeze()
        try:
            self._pool.submit(int).result()  # with fork, the first task starts every worker
        finally:
            if not frozen_before:  # a caller's own freeze stays
                gc.unfreeze()

    def chunk_images(self, preprocess: imaging.Preprocess) -> int:
        """Most images a chunk may hold: with processes, a quarter of the arena (never less than one)."""
        if self._arena is None:
            return 1 << 30
        return max(1, self._arena.size // 4 // (preprocess.crop_size ** 2 * 3))

    def decode(self, images: list[bytes], preprocess: imaging.Preprocess, max_pixels: int, wait: bool = True,
               alive: Callable[[], bool] | None = None) -> Chunk | None:
        """Starts decoding `images` (at most chunk_images) into a batch. While the arena is full it
        waits (given `alive`, only while alive() is true), or, without `wait`, returns None. A
        caller waits only while it holds no chunk that is not yet on its way to being released:
        the chunks that fill the arena then make way."""
        size = preprocess.crop_size
        if self._arena is None:
            rows = np.empty((len(images), size, size, 3), np.uint8)
            return Chunk(rows, [(i, self._pool.submit(decode_rows, rows[i:i + 1], images[i:i + 1], preprocess,
                                                      max_pixels)) for i in range(len(images))])
        rows_length = len(images) * size * size * 3
        # The images' bytes go to the processes through the arena too, after the rows, where both
        # fit in a quarter of it (as the rows alone do); otherwise they are pickled through the pipe.
        inputs_length = sum(map(len, images))
        in_arena = rows_length + inputs_length <= self._arena.size // 4
        length = -(-(rows_length + inputs_length if in_arena else rows_length) // _ALIGN) * _ALIGN
        start = self._arena.take(length, wait, alive)
        if start is None:
            return None
        rows = _rows(self._arena.memory, start, len(images), size)
        # A few parts a process: each part pays a round trip, and a slow image holds up only its part.
        step = -(-len(images) // (2 * self.workers))
        parts = []
        try:
            if in_arena:
                images = self._store(images, start + rows_length)
            for first in range(0, len(images), step):
                parts.append((first, self._pool.submit(_decode_in_arena, self._arena_number,
                                                       start + first * size * size * 3, images[first:first + step],
                                                       preprocess, max_pixels)))
        except BaseException:  # a broken pool (a process died) or one shut down: the rows go back
            for _, future in parts:
                future.cancel()
            Chunk(rows, parts, lambda: self._arena.give(start, length)).release()
            raise
        return Chunk(rows, parts, lambda: self._arena.give(start, length))

    def _store(self, images: list[bytes], start: int) -> list[tuple[int, int]]:
        """Copies `images` into the arena from `start` on: the (start, length) of each."""
        places = []
        for data in images:
            self._arena.memory[start:start + len(data)] = data
            places.append((start, len(data)))
            start += len(data)
        return places

    def shutdown(self) -> None:
        """Finishes the decoding started, then stops the workers (the arena is unmapped once no
        batch holds its rows)."""
        self._pool.shutdown(wait=True, cancel_futures=True)
        if self._arena is not None:
            _ARENAS.pop(self._arena_number, None)
