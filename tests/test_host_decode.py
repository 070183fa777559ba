"""Decoding on the host straight into the batch: processes write into a shared arena, threads
into the chunk's array, the good images' rows are handed on as they lie, and a full arena makes
chunks wait for the ones whose batches have run."""

import concurrent.futures
import gc
import io
import itertools
import os
import signal
import time
from concurrent.futures.process import BrokenProcessPool

import grpc
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from skimage import data as skdata

from convsearch.extractor.v1 import extractor_pb2 as pb
from convsearch.extractor.v1 import extractor_pb2_grpc
from convsearch_extractor import pixels
from convsearch_extractor.batcher import cancel_pending, gather
from convsearch_extractor.host_decode import Chunk, PixelDecoder, _Arena
from convsearch_extractor.imaging import ImageError, decode
from tests.conftest import jpeg_bytes, serve_extractor


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def images() -> list[bytes]:
    return [jpeg_bytes(skdata.chelsea()), png_bytes(skdata.coffee()), jpeg_bytes(skdata.astronaut()),
            jpeg_bytes(skdata.rocket())]


@pytest.fixture(scope="module", params=[(2, 0), (0, 2)], ids=["processes", "threads"])
def decoder(request):
    pool = PixelDecoder(*request.param, arena_bytes=1 << 20)
    yield pool
    pool.shutdown()


def test_the_chunk_is_the_batch_the_decoder_gives(decoder, images):
    chunk = decoder.decode(images, pixels.PREPROCESS, 10**8)
    rows, good, errors = chunk.result()
    assert good == [0, 1, 2, 3] and errors == []
    assert chunk.result()[0] is rows  # the rows the workers wrote into, handed on without a copy
    if decoder.processes:
        assert not rows.flags.owndata  # in the shared arena
    expected = np.stack([decode(data, pixels.PREPROCESS, 10**8) for data in images])
    assert np.array_equal(rows, expected)
    chunk.release()


def test_bad_images_are_named_by_position_and_left_out(decoder, images):
    chunk = decoder.decode([images[0], b"not an image", images[2], images[3][:300]], pixels.PREPROCESS, 10**8)
    rows, good, errors = chunk.result()
    assert good == [0, 2]
    assert [position for position, _ in errors] == [1, 3]
    assert all(isinstance(error, ImageError) for _, error in errors)
    assert "truncated" in str(errors[1][1])
    expected = np.stack([decode(images[i], pixels.PREPROCESS, 10**8) for i in (0, 2)])
    assert np.array_equal(rows, expected)
    chunk.release()


def test_a_full_arena_makes_chunks_wait_until_a_batch_has_run(images):
    decoder = PixelDecoder(2, 0, arena_bytes=1 << 20)
    try:
        per_chunk = decoder.chunk_images(pixels.PREPROCESS)
        assert per_chunk == (1 << 20) // 4 // (64 * 64 * 3)
        many = [images[i % len(images)] for i in range(per_chunk)]
        held = [decoder.decode(many, pixels.PREPROCESS, 10**8) for _ in range(4)]
        assert decoder.decode(many, pixels.PREPROCESS, 10**8, wait=False) is None
        waiting = concurrent.futures.ThreadPoolExecutor(1).submit(decoder.decode, many, pixels.PREPROCESS, 10**8)
        with pytest.raises(concurrent.futures.TimeoutError):
            waiting.result(timeout=0.5)
        first_rows = held[0].result()[0].copy()
        held[0].release()
        fifth = waiting.result(timeout=30)
        assert np.array_equal(fifth.result()[0], first_rows)
        for chunk in [*held[1:], fifth]:
            chunk.result()
            chunk.release()
        assert decoder.decode(many, pixels.PREPROCESS, 10**8, wait=False) is not None
    finally:
        decoder.shutdown()


def test_rows_are_freed_only_once_both_the_decoding_and_the_batch_are_done():
    freed = []
    decoding = concurrent.futures.Future()
    chunk = Chunk(np.zeros((1, 2, 2, 3), np.uint8), [(0, decoding)], lambda: freed.append(True))
    chunk.release()  # the batch ran (or the request failed) while a process still writes the rows
    assert not freed
    decoding.set_result([None])
    assert freed == [True]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(1, 40), st.integers(0, 1000)), max_size=60))
def test_the_arena_never_hands_out_a_byte_twice_and_gets_every_byte_back(steps):
    arena = _Arena(100)
    taken: dict[int, int] = {}
    for take, length, pick in steps:
        if take:
            start = arena.take(length, wait=False)
            if start is None:
                assert all(free < length for _, free in arena._free)
                continue
            assert 0 <= start and start + length <= 100
            assert all(start + length <= other or other + size <= start for other, size in taken.items())
            taken[start] = length
        elif taken:
            start = sorted(taken)[pick % len(taken)]
            arena.give(start, taken.pop(start))
        ranges = sorted([*arena._free, *taken.items()])
        assert sum(size for _, size in ranges) == 100
        assert all(a + size == b for (a, size), (b, _) in itertools.pairwise(ranges))
        assert all(a + size < b for (a, size), (b, _) in itertools.pairwise(arena._free))  # merged
    for start, length in taken.items():
        arena.give(start, length)
    assert arena._free == [(0, 100)]


def test_requests_beyond_the_arena_wait_their_turn_and_get_the_threads_vectors(extractor, chelsea_jpeg,
                                                                              coffee_jpeg):
    service, channel, _ = serve_extractor(decode_processes=2, decode_arena_mb=16, max_batch=64)
    try:
        stub = extractor_pb2_grpc.ExtractorServiceStub(channel)
        config = pb.EmbedConfig(model="efficientnet_lite0", layers=["_conv_head"])
        images = [chelsea_jpeg, coffee_jpeg] * 27  # two chunks of 27 (a quarter of the arena each)
        request = pb.EmbedRequest(config=config, images=images)
        with concurrent.futures.ThreadPoolExecutor(4) as clients:  # 8 chunks of 4 MiB: twice the arena
            answers = list(clients.map(lambda _: stub.Embed(request, timeout=300), range(4)))
        threaded = extractor.stub.Embed(pb.EmbedRequest(config=config, images=images[:2]), timeout=60)
        expected = np.frombuffer(threaded.layers[0].vectors.data, np.float32).reshape(2, -1)
        for answer in answers:
            vectors = np.frombuffer(answer.layers[0].vectors.data, np.float32).reshape(len(images), -1)
            np.testing.assert_allclose(vectors, np.tile(expected, (27, 1)), rtol=1e-4, atol=1e-5)
        with pytest.raises(grpc.RpcError) as error:
            stub.Embed(pb.EmbedRequest(config=config, images=[*images, b"junk"]), timeout=60)
        assert "image 54 " in error.value.details()
        assert stub.Embed(request, timeout=300).layers[0].vectors.shape == [54, 1280]  # nothing held on
    finally:
        channel.close()
        service.stop(1.0)


def test_a_large_range_waits_its_turn_ahead_of_smaller_ones():
    arena = _Arena(100)
    first, second = arena.take(60, wait=False), arena.take(40, wait=False)
    large = concurrent.futures.ThreadPoolExecutor(1).submit(arena.take, 80, True)
    with pytest.raises(concurrent.futures.TimeoutError):
        large.result(timeout=0.3)
    arena.give(second, 40)
    assert arena.take(10, wait=False) is None  # room for it, but the large one came first
    arena.give(first, 60)
    assert large.result(timeout=10) == 0
    assert arena.take(20, wait=False) == 80


def test_a_decode_process_that_dies_gives_its_rows_back_and_the_error_is_raised(images):
    decoder = PixelDecoder(1, 0, arena_bytes=1 << 20)
    try:
        chunk = decoder.decode(images, pixels.PREPROCESS, 10**8)
        chunk.result()
        chunk.release()
        for pid in list(decoder._pool._processes):
            os.kill(pid, signal.SIGKILL)
        with pytest.raises(BrokenProcessPool):  # the decoding under way fails
            for _ in range(50):
                chunk = decoder.decode(images, pixels.PREPROCESS, 10**8)
                try:
                    chunk.result()
                finally:
                    chunk.release()
                time.sleep(0.1)
        with pytest.raises(BrokenProcessPool):  # and from then on, starting any
            decoder.decode(images, pixels.PREPROCESS, 10**8)
        assert decoder._arena._free == [(0, 1 << 20)]
    finally:
        decoder.shutdown()


def test_a_batch_split_over_workers_gives_its_parts_results_joined():
    parts = [concurrent.futures.Future(), concurrent.futures.Future()]
    joined = gather(parts)
    for part in parts:
        part.set_result({"layer": np.zeros((1, 2))})
    assert joined.result()["layer"].shape == (2, 2)


def test_cancelling_a_split_batch_drops_the_parts_not_started_and_ends_after_the_running_ones():
    parts = [concurrent.futures.Future(), concurrent.futures.Future()]
    joined = gather(parts)
    assert not joined.cancel()  # not itself: its pixels stay in use until every part has run
    parts[0].set_running_or_notify_cancel()  # a model worker runs it
    cancel_pending(joined)
    assert parts[1].cancelled()
    assert not joined.done()  # its pixels stay in use until the running part has run
    parts[0].set_result({"layer": np.zeros((1, 2))})
    assert isinstance(joined.exception(timeout=1), concurrent.futures.CancelledError)


def _private_mb_a_collection_copies() -> float:
    """In a decode process: MB of private memory a full garbage collection adds (the pages of the
    objects it inherited that the collector writes to, copied from the service's)."""
    def private_kb() -> int:
        with open("/proc/self/smaps_rollup") as rollup:
            return sum(int(line.split()[1]) for line in rollup if line.startswith(("Private_Clean", "Private_Dirty")))

    before = private_kb()
    gc.collect()
    return (private_kb() - before) / 1024


def test_decode_processes_keep_sharing_the_service_memory_they_were_forked_with():
    # A service imports torch and loads models before it forks its decode processes; a
    # collection in a process would otherwise copy every page of the objects it inherited.
    inherited = [{"block": list(range(64))} for _ in range(100_000)]
    decoder = PixelDecoder(2, 0, arena_bytes=1 << 20)
    try:
        copied = [decoder._pool.submit(_private_mb_a_collection_copies).result() for _ in range(4)]
    finally:
        decoder.shutdown()
    assert len(inherited) and max(copied) < 4, f"a collection copied {max(copied):.1f} MB in a decode process"


def _all_free(decoder: PixelDecoder) -> bool:
    """Whether the whole arena is free within a few seconds (a part lets go of its rows in a
    callback that may run just after its result is seen)."""
    deadline = time.monotonic() + 10
    while decoder._arena._free != [(0, decoder._arena.size)] and time.monotonic() < deadline:
        time.sleep(0.01)
    return decoder._arena._free == [(0, decoder._arena.size)]


def test_the_images_bytes_reach_the_processes_through_the_arena_where_they_fit(images):
    decoder = PixelDecoder(2, 0, arena_bytes=1 << 20)
    small = [jpeg_bytes(skdata.chelsea()[::4, ::4]), jpeg_bytes(skdata.rocket()[::4, ::4])] * 3
    large = [images[1]]  # a PNG of more than a quarter of the arena
    assert len(large[0]) > 1 << 18
    rows_bytes = 64 * 64 * 3
    try:
        for chunk_images, used in ((small, rows_bytes * len(small) + sum(map(len, small))),
                                   (large, rows_bytes * len(large))):  # the bytes pickled through the pipe instead
            taken = -(-used // 64) * 64  # ranges start on cache lines
            chunk = decoder.decode(chunk_images, pixels.PREPROCESS, 10**8)
            assert (1 << 20) - sum(free for _, free in decoder._arena._free) == taken
            rows, good, errors = chunk.result()
            assert errors == [] and good == list(range(len(chunk_images)))
            assert np.array_equal(rows, np.stack([decode(data, pixels.PREPROCESS, 10**8) for data in chunk_images]))
            chunk.release()
            assert _all_free(decoder)
    finally:
        decoder.shutdown()


def test_a_wait_for_room_ends_once_the_client_is_gone(images):
    decoder = PixelDecoder(2, 0, arena_bytes=1 << 20)
    try:
        many = [images[0]] * decoder.chunk_images(pixels.PREPROCESS)
        held = [decoder.decode(many, pixels.PREPROCESS, 10**8) for _ in range(4)]
        client_there = [True]
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(decoder.decode, many, pixels.PREPROCESS, 10**8, True, lambda: client_there[0])
            with pytest.raises(concurrent.futures.TimeoutError):
                waiting.result(timeout=0.5)
            client_there[0] = False
            assert waiting.result(timeout=5) is None
        for chunk in held:
            chunk.result()
            chunk.release()
        assert _all_free(decoder)
    finally:
        decoder.shutdown()
