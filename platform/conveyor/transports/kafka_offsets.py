"""Offset bookkeeping of the Kafka consumer: settled prefixes and batched commits.

Every record handed out (or held for a delayed redelivery) is *taken* in its
partition's :class:`PartitionOffsets`; settling marks it done, and the offset
after the longest settled prefix is what gets committed. Settling out of order
(the runtime runs keys concurrently) therefore never commits past an unsettled
record, and Kafka's gaps in offsets (compaction, transaction markers) are
harmless because only offsets actually taken are tracked.

:class:`Committer` commits in the background, in rounds: one request in
flight per consumer; offsets settled meanwhile ride on the next request. No ack
waits for a commit: it returns once its offset is recorded here. A round that
fails keeps its offsets and is retried after a backoff; a crash before the
commit redelivers the records settled since the last one (at-least-once; the
inbox absorbs the duplicates). A revocation or a close flushes: it commits
what is settled before the partitions are let go.

On revocation a partition first *drains* (nothing more is handed out; what
is out may still settle and commit), then is *revoked* (dropped: later
settles commit nothing, the partition's new owner redelivers).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka import errors as kafka_errors

from conveyor import errors
from conveyor.transports import kafka_marks

log = logging.getLogger("conveyor.transports.kafka")

_RETRY_FIRST = 0.1  # seconds before a failed commit round is retried; doubles per failure
_RETRY_MAX = 5.0

#: Commit errors that mean "the group moved on": the records are redelivered to
#: the partition's new owner, which at-least-once allows.
LOST_TO_REBALANCE = (
    kafka_errors.CommitFailedError,
    kafka_errors.IllegalStateError,
    kafka_errors.RebalanceInProgressError,
    kafka_errors.IllegalGenerationError,
    kafka_errors.UnknownMemberIdError,
)


class PartitionOffsets:
    """Offsets taken from one assigned partition, and how far they are settled.

    Attributes:
        tp: the partition.
        taken: offsets handed out or held, not yet part of the settled prefix, in order.
        settled: offsets settled out of order (an earlier taken one is not).
        out: deliveries handed out and not settled yet.
        draining: a revocation began: hand nothing more out.
        revoked: the partition is gone: settle nothing more.
        loading: its committed offset and attempt mark are being read: fetch nothing yet.
        marked: highest offset the durable attempt mark covers (-1: none).
        suspect: recovery runs through this offset (-1: not recovering): the
            previous owner died with records up to here handed out.
        tries: attempts known to have started and never settled, by offset
            (from the mark, and counted here during recovery).
        running: attempt of each delivery whose handler started and that is not settled, by offset.
        claimed: the delivery of each attempt running now, by offset (cancelled when a
            revocation's grace is over).
        fetched: offset of the next record the fetch loop expects (None: not known yet).
        generation: the group generation the partition was assigned in (None: not known);
            marks are written only while the member's generation is still this one.
    """

    __slots__ = ("claimed", "draining", "fetched", "generation", "loading", "marked", "out", "revoked", "running",
                 "settled", "suspect", "taken", "tp", "tries")  # fmt: skip

    def __init__(self, tp: TopicPartition, generation: int | None = None) -> None:
        self.tp = tp
        self.generation = generation
        self.taken: deque[int] = deque()
        self.settled: set[int] = set()
        self.out = 0
        self.draining = False
        self.revoked = False
        self.loading = True
        self.marked = -1
        self.suspect = -1
        self.tries: dict[int, int] = {}
        self.running: dict[int, int] = {}
        self.claimed: dict[int, Any] = {}
        self.fetched: int | None = None

    def restore(self, committed: int | None, mark: kafka_marks.Mark) -> None:
        """Take over from the previous owner: recover if it died with records in hand."""
        self.loading = False
        self.fetched = committed
        if mark.through < (committed or 0):  # no commit yet: the group started at the log's start
            return  # nothing was handed out beyond what is committed: a clean handover
        self.suspect = self.marked = mark.through
        if mark.offset >= (committed or 0):
            self.tries[mark.offset] = mark.tries

    def mark(self, through: int, *, running: bool = False) -> kafka_marks.Mark:
        """The mark to write before handing out records up to ``through``.

        Args:
            through: highest offset handed out (or about to be).
            running: count the attempts running now too (when letting go of them).
        """
        known = dict(self.tries)
        if running:
            known.update((o, max(a, known.get(o, 0))) for o, a in self.running.items())
        if not known:
            return kafka_marks.Mark(through)
        first = min(known)
        return kafka_marks.Mark(max(through, *known), first, known[first])

    def handover(self) -> kafka_marks.Mark:
        """The mark a member writes when it lets the partition go gracefully.

        Records that never started need no mark (the next owner runs them as
        new); attempts that started and never settled, and an unfinished
        recovery, are passed on.
        """
        if self.suspect < 0 and not self.running and not self.tries:
            return kafka_marks.CLEAN
        return self.mark(self.suspect, running=True)

    def take(self, offset: int) -> None:
        self.taken.append(offset)

    def finish(self, offset: int) -> None:
        """The delivery of ``offset`` was acked or nacked: its attempt ended."""
        self.running.pop(offset, None)
        self.tries.pop(offset, None)
        self.claimed.pop(offset, None)

    def settle(self, offset: int) -> int | None:
        """Mark ``offset`` done; return the offset to commit if the settled prefix grew."""
        taken = self.taken
        if taken and taken[0] == offset and not self.settled:
            taken.popleft()
            return offset + 1
        self.settled.add(offset)
        commit = None
        while taken and taken[0] in self.settled:
            done = taken.popleft()
            self.settled.discard(done)
            commit = done + 1
        return commit


class Committer:
    """Commits offsets in the background, in rounds: one request in flight, later offsets join the next.

    Nobody waits for a round but :meth:`flush`: an ack only queues its
    partition's new offset (:meth:`request`). A round that fails keeps its
    offsets and is retried after a backoff (sooner by a flush); a round lost to
    a rebalance is dropped (the partitions' new owner redelivers).

    Args:
        kafka: the group consumer.
        group: the group's name, for logs and errors.
        timeout: seconds one commit request may take before it counts as failed.
    """

    def __init__(self, kafka: AIOKafkaConsumer, group: str, timeout: float) -> None:
        self._kafka = kafka
        self._group = group
        self._timeout = timeout
        self._pending: dict[TopicPartition, int] = {}
        self._round: asyncio.Future[None] | None = None
        self._task: asyncio.Task[None] | None = None
        self._retry: asyncio.TimerHandle | None = None
        self._failures = 0  # rounds failed in a row
        self._stopped = False

    @property
    def idle(self) -> bool:
        """True when no offset waits to be committed and no commit is in flight."""
        return not self._pending and (self._task is None or self._task.done())

    def request(self, tp: TopicPartition, offset: int) -> None:
        """Queue ``offset`` of ``tp`` for the next round (after the backoff when rounds fail)."""
        self._pending[tp] = offset
        if self._retry is None:  # else the retry timer kicks
            self._kick()  # joins the round in flight's successor, or starts one

    def forget(self, tps: set[TopicPartition]) -> None:
        """Drop queued offsets of partitions this member no longer owns."""
        for tp in tps:
            self._pending.pop(tp, None)

    async def flush(self) -> None:
        """Commit every queued offset now (skipping a backoff); wait for that round.

        Raises:
            TransientTransportError: the round failed (its offsets stay queued).
        """
        while self._task is not None and not self._task.done():
            await asyncio.shield(self._task)
        self._cancel_retry()
        if self._pending:
            await asyncio.shield(self._kick())

    def stop(self) -> None:
        """Commit nothing more (call after the final :meth:`flush`)."""
        self._stopped = True
        self._cancel_retry()

    def _cancel_retry(self) -> None:
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None

    def _retry_now(self) -> None:
        self._retry = None
        if self._pending and not self._stopped:
            self._kick()

    def _kick(self) -> asyncio.Future[None]:
        if self._round is None:
            self._round = asyncio.get_running_loop().create_future()
            self._round.add_done_callback(_consume_exception)
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name=f"kafka-commit:{self._group}")
        return self._round

    async def _run(self) -> None:
        done: asyncio.Future[None] | None = None
        try:
            while self._pending and self._round is not None:
                offsets, self._pending = self._pending, {}
                done, self._round = self._round, None
                try:
                    # aiokafka retries retriable errors (broker away) without end: bound it.
                    await asyncio.wait_for(self._kafka.commit(offsets), self._timeout)
                except LOST_TO_REBALANCE as exc:
                    log.warning(
                        "offset commit of group %s lost to a rebalance (%s); records of %d partition(s) "
                        "will be redelivered to their new owner", self._group, exc, len(offsets),
                    )  # fmt: skip
                    _resolve(done, None)
                except Exception as exc:
                    for tp, offset in offsets.items():  # newer offsets queued meanwhile win
                        self._pending.setdefault(tp, offset)
                    self._failures += 1
                    delay = min(_RETRY_FIRST * 2 ** (self._failures - 1), _RETRY_MAX)
                    log.warning(
                        "offset commit of group %s failed (%r); retrying in %.1fs (a crash meanwhile "
                        "redelivers the records settled since the last commit)", self._group, exc, delay,
                    )  # fmt: skip
                    _resolve(done, _commit_error(self._group, exc))
                    if not self._stopped:
                        self._retry = asyncio.get_running_loop().call_later(delay, self._retry_now)
                    return
                else:
                    self._failures = 0
                    _resolve(done, None)
            if self._round is not None and not self._pending:  # its offsets were forgotten
                dropped, self._round = self._round, None
                _resolve(dropped, errors.TransportError("the partition was revoked before the offset was committed"))
        finally:
            # Only a cancellation gets here with waiters left; none may wait forever.
            for future in (done, self._round):
                if future is not None:
                    _resolve(future, errors.TransportError(f"offset commit of group {self._group} was cancelled"))


def _commit_error(group: str, exc: Exception) -> errors.TransportError:
    transient = isinstance(exc, kafka_errors.KafkaError | OSError | TimeoutError)
    kind = errors.TransientTransportError if transient else errors.TransportError
    return kind(f"offset commit of group {group} failed: {exc!r}")


def _resolve(future: asyncio.Future[None], exc: BaseException | None) -> None:
    if not future.done():
        if exc is None:
            future.set_result(None)
        else:
            future.set_exception(exc)


def _consume_exception(future: asyncio.Future[None]) -> None:
    if not future.cancelled():
        future.exception()  # retrieved: an ack cancelled while waiting must not log "never retrieved"
