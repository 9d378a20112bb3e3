"""Kafka attempt marks: their 63-bit encoding and what a partition makes of them."""

from __future__ import annotations

import pytest
from aiokafka import TopicPartition
from conveyor.transports.kafka_marks import CLEAN, Mark
from conveyor.transports.kafka_offsets import PartitionOffsets

TP = TopicPartition("t", 0)


@pytest.mark.parametrize(
    "mark",
    [CLEAN, Mark(0), Mark(0, 0, 1), Mark(41, 7, 3), Mark(2**46 - 2, 2**46 - 1025, 63), Mark(2**47 - 1)],
)
def test_mark_survives_encoding(mark: Mark) -> None:
    value = mark.encode()
    assert (Mark.decode(value), 0 <= value < 2**63) == (mark, True)


@pytest.mark.parametrize("distance", [1024, 1628, 3999, 4000, 10**6, 10**9, 3 * 10**10])
def test_mark_keeps_the_tries_of_a_record_far_before_its_through_offset(distance: int) -> None:
    mark = Mark(10 + distance, 10, 2)
    value = mark.encode()
    got = Mark.decode(value)
    assert (got.offset, got.tries, 0 <= value < 2**63) == (10, 2, True)
    assert mark.through <= got.through <= mark.through + distance // 8  # never shortened, at most an eighth more


def test_mark_of_the_old_layout_still_reads() -> None:
    assert Mark.decode(((41 + 1) << 16) | (34 << 6) | 3) == Mark(41, 7, 3)


def test_mark_saturates_tries_at_63() -> None:
    assert Mark.decode(Mark(9, 9, 500).encode()) == Mark(9, 9, 63)


def restored(committed: int | None, mark: Mark) -> PartitionOffsets:
    partition = PartitionOffsets(TP)
    partition.restore(committed, mark)
    return partition


def test_partition_does_not_recover_when_the_mark_is_behind_the_committed_offset() -> None:
    partition = restored(10, Mark(9, 9, 2))
    assert (partition.loading, partition.suspect, partition.tries) == (False, -1, {})


def test_partition_recovers_through_the_mark_with_its_known_tries() -> None:
    partition = restored(4, Mark(9, 6, 2))
    assert (partition.suspect, partition.marked, partition.tries) == (9, 9, {6: 2})


def test_partition_never_committed_recovers_from_the_start() -> None:
    assert restored(None, Mark(0, 0, 1)).tries == {0: 1}


def test_handover_without_started_attempts_is_clean() -> None:
    partition = restored(None, CLEAN)
    partition.marked = 30  # records were handed out, none of them started
    assert partition.handover() == CLEAN


def test_handover_counts_an_abandoned_started_attempt() -> None:
    partition = restored(3, CLEAN)
    partition.running[5] = 2
    assert partition.handover() == Mark(5, 5, 2)


def test_handover_keeps_an_unfinished_recovery() -> None:
    partition = restored(3, Mark(12, 3, 1))
    partition.finish(3)  # record 3 settled; 4..12 are still to be recovered
    assert partition.handover() == Mark(12)
