"""Micro-batching: concurrent requests for one model share a single forward pass.

Requests queue up on the event loop; one worker task takes everything waiting (up to
``max_batch_size``, after at most ``max_wait_seconds``) and hands the batch to ``run_batch`` in a
dedicated thread, so the event loop stays free for I/O while the model computes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Generic, TypeVar

logger = logging.getLogger(__name__)

Item = TypeVar("Item")


Made = TypeVar("Made")


class PerLoop(Generic[Made]):
    """One object (a lock, a semaphore) for the running event loop, made by ``make`` in the
    loop that first asks for it: asyncio's primitives belong to one loop, and a server's loop
    may follow a test client's."""

    def __init__(self, make: Callable[[], Made]) -> None:
        self._make = make
        self._held: tuple[asyncio.AbstractEventLoop, Made] | None = None

    def get(self) -> Made:
        loop = asyncio.get_running_loop()
        if self._held is None or self._held[0] is not loop:
            self._held = (loop, self._make())
        return self._held[1]


class MicroBatcher(Generic[Item]):
    """Collects single items into batches for ``run_batch`` and hands each caller its result.

    Args:
        run_batch: maps a list of items to a list of the same length holding, for each item,
            its result or the exception to raise to its caller.
        max_batch_size: the most items in one batch.
        max_wait_seconds: how long the first item of a batch waits for others; under load the
            queue fills while the previous batch runs, so a small wait suffices.

    Raises:
        ValueError: for a batch size under 1 or a negative wait.
    """

    def __init__(
        self,
        run_batch: Callable[[list[Item]], Sequence[Any]],
        max_batch_size: int = 16,
        max_wait_seconds: float = 0.002,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1; got {max_batch_size}")
        if max_wait_seconds < 0:
            raise ValueError(f"max_wait_seconds must be >= 0; got {max_wait_seconds}")
        self.run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.max_wait_seconds = max_wait_seconds
        self._queue: asyncio.Queue[tuple[Item, asyncio.Future]] | None = None
        self._worker: asyncio.Task | None = None
        self._executor: ThreadPoolExecutor | None = None
        self.batches_run = 0
        self.items_run = 0

    def _ensure_started(self) -> asyncio.Queue:
        # Started lazily inside the running loop, so it works with or without a lifespan.
        if self._worker is None or self._worker.done():
            self._queue = asyncio.Queue()
            self._executor = self._executor or ThreadPoolExecutor(1, "cnnkit-batch")
            self._worker = asyncio.get_running_loop().create_task(self._work())
        return self._queue

    async def submit(self, item: Item) -> Any:
        """Queue one item and wait for its result (or its exception, raised here)."""
        future = asyncio.get_running_loop().create_future()
        self._ensure_started().put_nowait((item, future))
        return await future

    async def close(self) -> None:
        """Stop the worker and its thread; pending callers get a ``RuntimeError``."""
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
            self._worker = None
        if self._queue is not None:
            while not self._queue.empty():
                _, future = self._queue.get_nowait()
                if not future.done():
                    future.set_exception(RuntimeError("the server is shutting down"))
        if self._executor is not None:
            self._executor.shutdown(wait=False)
            self._executor = None

    async def _collect(self) -> list[tuple[Item, asyncio.Future]]:
        queue = self._queue
        batch = [await queue.get()]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.max_wait_seconds
        while len(batch) < self.max_batch_size:
            if not queue.empty():
                batch.append(queue.get_nowait())
                continue
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(queue.get(), remaining))
            except asyncio.TimeoutError:
                break
        return batch

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._collect()
            # A caller that gave up (client disconnected) no longer needs its result.
            batch = [(item, future) for item, future in batch if not future.done()]
            if not batch:
                continue
            items = [item for item, _ in batch]
            try:
                results = await loop.run_in_executor(self._executor, self.run_batch, items)
                if len(results) != len(batch):
                    raise RuntimeError(
                        f"run_batch returned {len(results)} results for {len(batch)}"
                    )
            except BaseException as error:
                if not isinstance(error, asyncio.CancelledError):
                    logger.exception("a batch of %d failed", len(batch))
                failure = error if isinstance(error, Exception) else RuntimeError("cancelled")
                for _, future in batch:
                    if not future.done():
                        future.set_exception(failure)
                if isinstance(error, Exception):
                    continue
                raise
            self.batches_run += 1
            self.items_run += len(batch)
            for result, (_, future) in zip(results, batch, strict=True):
                if future.done():
                    continue
                if isinstance(result, BaseException):
                    future.set_exception(result)
                else:
                    future.set_result(result)
