"""The serving batcher: a batch is formed when the model is free, from everything waiting."""

from __future__ import annotations

import asyncio

import pytest

from serving.batching import Batcher


def _slow_model(sizes: list[int], seconds: float = 0.05):
    async def handler(items):
        sizes.append(len(items))
        await asyncio.sleep(seconds)  # the model: busy, while requests keep arriving
        return [item * 10 for item in items]

    return handler


def test_closed_loop_clients_get_full_batches_whatever_their_arrival():
    """8 clients arriving staggered (as over HTTP), max 4: between the first call and the last (the clients
    run out of requests) every call is full.
    (With `@serve.batch`, 8 such clients over HTTP got calls of 3, 3, 1, 1 rows, over and over: it forms a
    batch while the previous one runs.)"""
    sizes: list[int] = []

    async def main():
        batcher = Batcher(_slow_model(sizes), max_batch_size=4, batch_wait_timeout_s=0.005)

        async def client(i):
            await asyncio.sleep([0.0, 0.001, 0.002, 0.02, 0.021, 0.022, 0.03, 0.04][i])
            return [await batcher.submit(i * 100 + j) for j in range(4)]

        return await asyncio.gather(*(client(i) for i in range(8)))

    results = asyncio.run(main())
    assert results == [[(i * 100 + j) * 10 for j in range(4)] for i in range(8)]  # each gets its own answer
    assert sum(sizes) == 32 and sizes[0] == 3 and set(sizes[1:-1]) == {4}, sizes


def test_a_lone_request_waits_at_most_the_timeout_and_sizes_follow_reconfiguration():
    sizes: list[int] = []

    async def main():
        batcher = Batcher(_slow_model(sizes, 0.0), max_batch_size=4, batch_wait_timeout_s=0.01)
        loop = asyncio.get_running_loop()
        t = loop.time()
        assert await batcher.submit(1) == 10
        assert loop.time() - t < 0.5
        batcher.max_batch_size = 2  # what reconfigure() does
        return await asyncio.gather(*(batcher.submit(i) for i in range(5)))

    assert asyncio.run(main()) == [0, 10, 20, 30, 40]
    assert sizes == [1, 2, 2, 1]


def test_errors_reach_every_request_of_the_batch_and_cancelled_requests_are_skipped():
    seen: list[list[int]] = []

    async def handler(items):
        seen.append(items)
        if 13 in items:
            raise ValueError("bad row")
        return items

    async def main():
        batcher = Batcher(handler, max_batch_size=4, batch_wait_timeout_s=0.01)
        bad = await asyncio.gather(batcher.submit(12), batcher.submit(13), return_exceptions=True)
        cancelled = asyncio.ensure_future(batcher.submit(99))
        await asyncio.sleep(0)
        cancelled.cancel()
        ok = await batcher.submit(7)
        return bad, ok

    bad, ok = asyncio.run(main())
    assert all(isinstance(e, ValueError) for e in bad) and ok == 7
    assert [7] in seen and not any(99 in s for s in seen)


@pytest.mark.parametrize("max_batch_size", [1, 3])
def test_batches_never_exceed_max_batch_size(max_batch_size):
    sizes: list[int] = []

    async def main():
        batcher = Batcher(_slow_model(sizes, 0.001), max_batch_size=max_batch_size, batch_wait_timeout_s=0.01)
        return await asyncio.gather(*(batcher.submit(i) for i in range(10)))

    assert asyncio.run(main()) == [i * 10 for i in range(10)]
    assert max(sizes) == max_batch_size and sum(sizes) == 10
