"""Dynamic batching that forms each batch when the model is free.

`@serve.batch` forms the next batch as soon as requests arrive, even while the previous
batch is still running (the batch then only waits for its turn): with a model that
takes seconds per call, a request arriving alone becomes a batch of one, and closed-loop
clients stay in the groups they first arrived in. Measured (bench/serving.py, debug
preset, one replica, 8 clients, max_batch_size 4): pipeline calls of 3, 3, 1, 1 rows,
over and over, while 4 requests were always waiting.

`Batcher` takes a batch only once the previous one has finished: everything waiting, up
to `max_batch_size`; only when fewer are waiting does it wait for more, until
`batch_wait_timeout_s` after the oldest one arrived. One batch runs at a time.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Awaitable, Callable
from typing import Any


class Batcher:
    """`await batcher.submit(item)` -> this item's result from `handler(items) -> results` (same order)."""

    def __init__(
        self,
        handler: Callable[[list[Any]], Awaitable[list[Any]]],
        max_batch_size: int,
        batch_wait_timeout_s: float,
    ):
        self.handler = handler
        self.max_batch_size = max_batch_size
        self.batch_wait_timeout_s = batch_wait_timeout_s
        self._waiting: collections.deque[tuple[Any, asyncio.Future, float]] = collections.deque()
        self._arrived: asyncio.Event | None = None
        self._runner: asyncio.Task | None = None

    async def submit(self, item: Any) -> Any:
        loop = asyncio.get_running_loop()
        if self._arrived is None:
            self._arrived = asyncio.Event()
        future = loop.create_future()
        self._waiting.append((item, future, time.monotonic()))
        self._arrived.set()
        if self._runner is None or self._runner.done():
            self._runner = loop.create_task(self._run())
        return await future  # a cancelled request cancels its future; the runner skips it

    async def _run(self) -> None:
        """Batches until nothing is waiting; the next submit starts a new runner."""
        while self._waiting:
            # 1. wait for batch-mates only while the batch is not full and the oldest request is young
            while len(self._waiting) < self.max_batch_size:
                left = self._waiting[0][2] + self.batch_wait_timeout_s - time.monotonic()
                if left <= 0:
                    break
                self._arrived.clear()
                try:
                    await asyncio.wait_for(self._arrived.wait(), left)
                except asyncio.TimeoutError:
                    break
            # 2. take the batch and run it; results (or the error) go to each request
            n = min(self.max_batch_size, len(self._waiting))
            batch = [w for w in (self._waiting.popleft() for _ in range(n)) if not w[1].done()]
            if not batch:
                continue
            try:
                results = await self.handler([item for item, _, _ in batch])
            except Exception as e:  # noqa: BLE001 - handed to the requests, the runner goes on
                for _, future, _ in batch:
                    if not future.done():
                        future.set_exception(e)
                continue
            for (_, future, _), result in zip(batch, results):
                if not future.done():
                    future.set_result(result)
