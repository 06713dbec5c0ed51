"""Micro-batching: concurrent requests are collected for a few milliseconds and run as one batch in a thread.

Used wherever a model serves many callers at once (the difficulty check's policy rollouts, the
local OpenAI-compatible server): batched generation is far cheaper per request than one call each,
and running it in a worker thread keeps the event loop responsive.

Example:
    >>> import asyncio
    >>> async def demo():
    ...     batcher = MicroBatcher(lambda xs: [x * 2 for x in xs], max_size=8)
    ...     try:
    ...         return await asyncio.gather(*(batcher.submit(i) for i in range(3)))
    ...     finally:
    ...         await batcher.close()
    >>> asyncio.run(demo())
    [0, 2, 4]
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class MicroBatcher(Generic[T, R]):
    """Batches `submit` calls: at most `max_size` per call of `fn`, waiting at most `window_s` for more.

    `fn` maps a list of requests to the list of their results, in order; it runs in a worker thread,
    one batch at a time. An exception from `fn` fails every request of that batch.
    """

    def __init__(self, fn: Callable[[list[T]], list[R]], max_size: int, window_s: float = 0.005):
        self.fn = fn
        self.max_size = max_size
        self.window_s = window_s
        self._queue: asyncio.Queue[tuple[T, asyncio.Future[R]]] | None = None
        self._task: asyncio.Task[None] | None = None

    async def submit(self, request: T) -> R:
        """The result of `request`, computed in some batch."""
        if self._task is None or self._task.done():
            self._queue = asyncio.Queue()
            self._task = asyncio.create_task(self._serve(self._queue))
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        assert self._queue is not None
        await self._queue.put((request, future))
        return await future

    async def close(self) -> None:
        """Stop the batching task (pending requests are cancelled)."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _serve(self, queue: asyncio.Queue[tuple[T, asyncio.Future[R]]]) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await queue.get()]
            deadline = loop.time() + self.window_s
            while len(batch) < self.max_size:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(queue.get(), remaining))
                except TimeoutError:
                    break
            live = [(request, future) for request, future in batch if not future.done()]
            if not live:
                continue
            try:
                results = await asyncio.to_thread(self.fn, [request for request, _ in live])
            except Exception as exc:  # noqa: BLE001 - the batch's callers get the error
                for _, future in live:
                    if not future.done():
                        future.set_exception(exc)
                continue
            for (_, future), result in zip(live, results):
                if not future.done():
                    future.set_result(result)
