"""Dynamic batching: requests that arrive together share one model call.

One asyncio queue and one worker task. The worker takes the first waiting job, then keeps
taking jobs until it holds `max_batch` or `wait_seconds` have passed since the first, and
runs them as one call of `run` in its own thread (so the event loop keeps accepting and
reading requests meanwhile). While that call runs, new jobs queue up and form the next
batch at once: under load batches fill without waiting, and a lone request waits at most
`wait_seconds`. `max_batch=1` runs every job alone, one at a time.

With `sizes` (the padded batch sizes the model runs, e.g. 1, 2, 4, ..., 32), a batch of at
least `MIN_CUT` jobs is cut to the largest size it fills and the rest waits for the next
batch (first in line): 17 jobs run as 16 now and 1 with the next arrivals, rather than as 17
padded to 32, so under load model calls compute little padding. Smaller batches are not
cut: there a second model call would cost more than the padding (on CPU, a call's fixed
cost is about that of 8 images of ResNet-18 64x32).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Callable, Sequence
from typing import Any

MIN_CUT = 8


class Batcher:
    """Gathers jobs into batches for `run(jobs) -> results` (same length, same order).

    Args:
      run: called in a worker thread with a list of 1..max_batch jobs.
      max_batch: the most jobs per call.
      wait_seconds: how long the first job of a batch waits for others.
      on_batch: called with each batch's size (metrics).
      sizes: the batch sizes the model runs without padding (see the module docstring).
    """

    def __init__(
        self,
        run: Callable[[Sequence[Any]], Sequence[Any]],
        max_batch: int,
        wait_seconds: float,
        on_batch: Callable[[int], None] | None = None,
        sizes: Sequence[int] = (),
    ):
        self.run = run
        self.max_batch = int(max_batch)
        self.wait_seconds = float(wait_seconds) if max_batch > 1 else 0.0
        self.on_batch = on_batch
        self.sizes = sorted(set(sizes))
        self._carried: list = []  # jobs cut from the last batch: first in the next
        self._queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None
        # One thread: the model runs one batch at a time (XLA uses every core for it).
        self._thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="batch")

    async def start(self) -> None:
        self._queue = asyncio.Queue()
        self._task = asyncio.create_task(self._work(), name="batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._thread.shutdown(wait=True, cancel_futures=True)

    async def __call__(self, job: Any) -> Any:
        """The result of `job`, computed in some batch (its exception is raised here)."""
        future = asyncio.get_running_loop().create_future()
        await self._queue.put((job, future))
        return await future

    async def _gather(self) -> list:
        batch, self._carried = self._carried, []
        if not batch:
            batch = [await self._queue.get()]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.wait_seconds
        while len(batch) < self.max_batch:
            try:
                batch.append(self._queue.get_nowait())
                continue
            except asyncio.QueueEmpty:
                pass
            left = deadline - loop.time()
            if left <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), left))
            except asyncio.TimeoutError:
                break
        # A request that gave up (client gone, deadline) is not computed.
        batch = [(job, future) for job, future in batch if not future.done()]
        fits = [size for size in self.sizes if size <= len(batch)]
        if fits and fits[-1] >= MIN_CUT:
            batch, self._carried = batch[: fits[-1]], batch[fits[-1] :]
        return batch

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._gather()
            if not batch:
                continue
            if self.on_batch is not None:
                self.on_batch(len(batch))
            jobs = [job for job, _ in batch]
            try:
                results = await loop.run_in_executor(self._thread, self.run, jobs)
            except Exception as e:  # handed to every waiting request
                for _, future in batch:
                    if not future.done():
                        future.set_exception(e)
                continue
            for (_, future), result in zip(batch, results):
                if not future.done():
                    future.set_result(result)
