"""Batch handlers (``@on(..., batch=N)``): one call for up to N messages, each settled on its own.

A :class:`BatchDispatcher` takes a batch handler's deliveries from the
transport in place of the :class:`~conveyor.runtime.dispatch.Dispatcher`.
Each delivery is admitted as usual (too large, delivered too often and poison
messages are dead-lettered on their own and never reach the handler), then
collected; a batch is handed to the handler once it holds ``batch`` messages
or ``batch_wait`` seconds after its first one arrived, whichever comes
first. Batches of one handler run one after another, in arrival order, so
per-key order holds; the next batch is collected while one runs.

Each message of a batch is settled on its own:

* the handler returns ``None``: every message is acked;
* it returns a mapping ``{index: exception}``: those messages fail as if a
  single-message handler had raised that exception (``Retry``, ``Reject`` or
  any other: a retry with backoff, dead-lettered once its own attempts are
  spent) and the rest are acked;
* it raises: every message of the batch fails with that exception;
* an outage of the database or the broker holds the whole batch and calls
  the handler again after a backoff, spending no attempt.

The handler's ``timeout`` bounds each call. Handler duration metrics observe
whole calls; message counts are per message.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from typing import Any

from conveyor import envelope, errors, fate, ports
from conveyor.runtime import failures, handling

log = logging.getLogger("conveyor.worker")

Admitted = tuple[ports.Delivery, envelope.Envelope, Any]


class BatchDispatcher:
    """Collects a batch handler's deliveries into batches and runs them one after another.

    Args:
        runner: the handler's runner (admission, settling, dead letters).
        size: most messages per call.
        wait: longest a batch waits for more messages after its first one, in seconds.
    """

    def __init__(self, runner: handling.HandlerRunner, size: int, wait: float) -> None:
        self._runner = runner
        self._size = size
        self._wait = wait
        self._accepted = asyncio.Semaphore(size * 2)
        self._pending: list[ports.Delivery] = []
        self._timer: asyncio.TimerHandle | None = None
        self._turn = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def in_flight(self) -> int:
        """Deliveries accepted and not yet finished."""
        return self._in_flight

    async def submit(self, delivery: ports.Delivery) -> None:
        """Accept a delivery; waits while two batches' worth are accepted and unfinished."""
        await self._accepted.acquire()
        self._in_flight += 1
        self._idle.clear()
        self._pending.append(delivery)
        if len(self._pending) >= self._size:
            self._flush()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self._wait, self._flush)

    def _flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        batch, self._pending = self._pending, []
        if batch:
            task = asyncio.ensure_future(self._run(batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _run(self, batch: list[ports.Delivery]) -> None:
        try:
            async with self._turn:  # FIFO: batches run in the order they were collected
                await process_batch(self._runner, batch)
        finally:
            for _ in batch:
                self._accepted.release()
            self._in_flight -= len(batch)
            if not self._in_flight:
                self._idle.set()

    async def drain(self, timeout: float) -> bool:
        """Run what was collected, then wait up to ``timeout`` seconds for it to finish.

        Work still running at the deadline is cancelled and left unsettled, so
        the broker delivers it again.

        Returns:
            True if everything finished in time.
        """
        self._flush()
        try:
            async with asyncio.timeout(timeout):
                await self._idle.wait()
            return True
        except TimeoutError:
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            return False


async def process_batch(runner: handling.HandlerRunner, deliveries: list[ports.Delivery]) -> None:
    """Admit, run and settle one batch. Never raises (but for cancellation).

    Each message is settled on its own: a message whose admission or settling
    fails unexpectedly is dead-lettered alone, and one whose settling the
    broker refuses is left to its redelivery; the others are settled as usual.
    """
    admitted: list[Admitted] = []
    for delivery in deliveries:
        claim = getattr(delivery, "claim", None)
        if claim is not None and not claim():
            continue  # its partition was revoked while it waited: the new owner runs it
        try:
            decoded = await runner.admit(delivery)
        except asyncio.CancelledError:
            raise
        except errors.TransportError:
            log.exception("could not settle a delivery of %s; the broker will redeliver it", runner.handler.name)
            continue
        except Exception as exc:  # a bug while decoding (a validator raising TypeError, say): this message only
            log.exception("could not decide the fate of a message of %s; dead-lettering it", runner.handler.name)
            await runner.last_resort(delivery, exc)
            continue
        if decoded is not None:
            admitted.append((delivery, *decoded))
    if not admitted:
        return
    token = runner.took()
    settled: set[int] = set()
    try:
        await _run(runner, admitted, settled)
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        log.exception("could not decide the fate of a batch of %s; dead-lettering it", runner.handler.name)
        for index, (delivery, _, _) in enumerate(admitted):
            if index not in settled:
                await runner.last_resort(delivery, exc)
    finally:
        runner.let_go(token)


async def _run(runner: handling.HandlerRunner, batch: list[Admitted], settled: set[int]) -> None:
    handler = runner.handler
    payloads = [payload for _, _, payload in batch]
    tries = fate.Tries(min(message.attempt for _, message, _ in batch))
    while True:
        started = time.perf_counter()
        deadline = runner.deadlines.start()
        try:
            try:
                result = await handler.func(payloads)
            except asyncio.CancelledError:
                if runner.deadlines.finish(deadline):
                    raise TimeoutError(f"attempt exceeded the handler timeout of {handler.timeout}s") from None
                raise
            except (SystemExit, KeyboardInterrupt) as exc:  # from the handler: it must not stop the worker
                raise failures.HandlerExit(exc) from exc
            finally:
                runner.deadlines.finish(deadline)
                runner.observe(time.perf_counter() - started)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            outcome = await runner.settler.decide(fate.Phase.HANDLER, exc, tries)
            if isinstance(outcome, fate.Hold):  # an outage its probe confirms, or a conflict: the whole batch waits
                tries = await runner.settler.hold(outcome, tries)
                continue
            await _settle(runner, batch, dict.fromkeys(range(len(batch)), exc), settled)
            return
        break
    await _settle(runner, batch, _failures(result, len(batch), handler.where), settled)


async def _settle(
    runner: handling.HandlerRunner, batch: list[Admitted], failures: Mapping[int, BaseException], settled: set[int]
) -> None:
    """Settle every message of the batch, each on its own: one that cannot be settled does not stop the rest."""
    for index, (delivery, message, _) in enumerate(batch):
        settled.add(index)
        failure = failures.get(index)
        try:
            if failure is None:
                await delivery.ack()
                runner.count("succeeded")
            else:
                await runner.settle_failure(delivery, message.attempt, failure)
        except errors.TransportError:
            log.exception("could not settle a delivery of %s; the broker will redeliver it", runner.handler.name)
        except Exception as exc:
            log.exception("could not decide the fate of a message of %s; dead-lettering it", runner.handler.name)
            await runner.last_resort(delivery, exc)


def _failures(result: object, size: int, where: str) -> Mapping[int, BaseException]:
    """The handler's ``{index: exception}`` (or nothing), checked."""
    if result is None:
        return {}
    problem = None
    if not isinstance(result, Mapping):
        problem = f"returned {type(result).__name__}, not None or a mapping of failed indexes to exceptions"
    elif not all(isinstance(i, int) and 0 <= i < size and isinstance(e, BaseException) for i, e in result.items()):
        problem = f"returned failures that are not {{index in 0..{size - 1}: exception}}"
    if problem is None:
        return result  # type: ignore[return-value]
    error = TypeError(f"batch handler {where} {problem}")
    return dict.fromkeys(range(size), error)
