"""The dynamic batcher: requests that do not fit a batch wait for the next one without stopping
it, and cancelled requests never reach the model."""

import threading
import time

import numpy as np

from convsearch_extractor.batcher import DynamicBatcher


def _pixels(count: int) -> np.ndarray:
    return np.zeros((count, 2, 2, 3), np.uint8)


class _Model:
    """Runs batches once let through; remembers their sizes."""

    def __init__(self):
        self.let_through = threading.Event()
        self.batches: list[int] = []

    def __call__(self, _key, pixels):
        self.let_through.wait(10)
        self.batches.append(len(pixels))
        return {"v": np.arange(len(pixels), dtype=np.float32)[:, None]}


def _close(batcher: DynamicBatcher, model: _Model) -> None:
    """Closes the batcher, or gives up after 10 s (a batcher whose thread died would never close)."""
    model.let_through.set()
    closing = threading.Thread(target=batcher.close, daemon=True)
    closing.start()
    closing.join(10)


def test_a_request_passed_over_for_not_fitting_does_not_stop_the_batcher():
    model = _Model()
    batcher = DynamicBatcher(model, max_batch=4, max_delay_s=0.001, workers=1)
    try:
        running = batcher.submit("k", _pixels(4))  # holds the only worker
        time.sleep(0.2)
        # The next batch takes 2 + 2: the 4 between them does not fit and waits for the one after.
        queued = [batcher.submit("k", _pixels(n)) for n in (2, 4, 2)]
        model.let_through.set()
        assert [len(f.result(timeout=10)["v"]) for f in (running, *queued)] == [4, 2, 4, 2]
        assert model.batches == [4, 4, 4]
    finally:
        _close(batcher, model)


def test_cancelled_requests_never_reach_the_model():
    model = _Model()
    batcher = DynamicBatcher(model, max_batch=4, max_delay_s=0.001, workers=1)
    try:
        running = batcher.submit("k", _pixels(4))
        time.sleep(0.2)
        gone, kept = batcher.submit("k", _pixels(4)), batcher.submit("k", _pixels(3))
        assert gone.cancel()
        model.let_through.set()
        assert len(kept.result(timeout=10)["v"]) == 3 and len(running.result(timeout=10)["v"]) == 4
        assert model.batches == [4, 3]
    finally:
        _close(batcher, model)
