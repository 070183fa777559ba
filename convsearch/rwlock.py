"""A writer-preferring reader-writer lock: many readers at once, one writer alone."""

import contextlib
import threading


class RWLock:
    """`read()` shared, `write()` alone; a waiting writer goes before new readers. The index keeps
    hnswlib's rule with it (add_items never overlaps knn_query, queries run together); the
    extractor keeps torch.fx's (no forward pass while a model is traced)."""

    def __init__(self):
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False
        self._waiting_writers = 0

    @contextlib.contextmanager
    def read(self):
        with self._cond:
            while self._writer or self._waiting_writers:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if not self._readers:
                    self._cond.notify_all()

    @contextlib.contextmanager
    def write(self):
        with self._cond:
            self._waiting_writers += 1
            while self._writer or self._readers:
                self._cond.wait()
            self._waiting_writers -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()
