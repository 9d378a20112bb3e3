"""The SQL of the outbox claim (see :mod:`event_store.outbox_store` for the rules it implements)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import sqlalchemy as sa
from conveyor import stores
from sqlalchemy.engine import Dialect

from event_store import models
from event_store.outbox import as_utc

# True when no earlier unsent row of o's key makes the key wait. The terms of
# the inner WHERE imply the predicate of ix_outbox_retrying (models.OUTBOX_RETRYING),
# so each probe is an index lookup on (partition_key, id).
_NOT_WAITING = """NOT EXISTS (
    SELECT 1 FROM outbox w
    WHERE w.partition_key = o.partition_key AND w.id < o.id
      AND w.sent_at IS NULL AND (w.attempts > 0 OR w.parked_at IS NOT NULL)
      AND (w.parked_at IS NOT NULL OR w.available_at > {now})
)"""
# Rows and keys of the store's own open claims are left out before the window, so a claim made
# while the previous batch publishes looks past that batch (else its rows and keys could fill the
# window and leave nothing claimable). Other relays' claims are skipped by the lock and the key-prefix rule.
_NOT_BUSY_PG = """o.id <> ALL(CAST(:busy_ids AS BIGINT[]))
      AND (o.partition_key IS NULL OR o.partition_key <> ALL(CAST(:busy_keys AS TEXT[])))"""
_NOT_BUSY_SQLITE = "o.id NOT IN :busy_ids AND (o.partition_key IS NULL OR o.partition_key NOT IN :busy_keys)"
# The comment on the first line names the claim in pg_stat_activity, whose `query` keeps
# only the first 1 KB by default (the lock clause at the end is cut off there).
_HEAD = """/* conveyor-outbox-claim */
WITH head AS (
    SELECT o.id, o.partition_key FROM outbox o
    WHERE o.sent_at IS NULL AND o.parked_at IS NULL AND o.available_at <= {now}
      AND {not_busy}
      AND {not_waiting}
    ORDER BY o.id
    LIMIT :window
), ranked AS (
    SELECT id, partition_key, row_number() OVER (PARTITION BY partition_key ORDER BY id) AS rn
    FROM head
){rest}"""
_COLUMNS = "o.id, o.message_id, o.topic, o.partition_key, o.headers, o.body, o.attempts, o.created_at"
# PostgreSQL: the candidates (ids and ranks, in id order) are two arrays computed once
# (InitPlans), so the locked scan of outbox is an index lookup of at most `window` ids
# whatever the planner estimates. Joined with the CTE instead, a table without fresh
# statistics was nested-looped over the CTE once per unsent row: a 100 ms claim with
# 1,000 unsent rows, long enough for a failing key's backoff to run out before the
# next claim, so that key filled every window and starved the others.
_CLAIM_PG = """
, candidates AS (
    SELECT ARRAY(SELECT id FROM ranked WHERE partition_key IS NULL OR rn <= :per_key ORDER BY id) AS ids,
           ARRAY(SELECT rn FROM ranked WHERE partition_key IS NULL OR rn <= :per_key ORDER BY id) AS rns
)
SELECT {columns}, c.rns[array_position(c.ids, o.id)] AS rn
FROM candidates c, outbox o
WHERE o.id = ANY(c.ids) AND o.sent_at IS NULL AND o.parked_at IS NULL
ORDER BY o.id
LIMIT :limit
FOR UPDATE OF o SKIP LOCKED
"""
# SQLite: no row locks; the rows of this store's open claims are left out of the window.
_CLAIM_SQLITE = """
SELECT {columns}, r.rn
FROM outbox o JOIN ranked r ON r.id = o.id
WHERE o.sent_at IS NULL AND o.parked_at IS NULL
  AND (r.partition_key IS NULL OR r.rn <= :per_key)
ORDER BY o.id
LIMIT :limit
"""
_NEXT_DUE = """
SELECT min(o.available_at) AS earliest, {now} AS now FROM outbox o
WHERE o.sent_at IS NULL AND o.parked_at IS NULL AND {not_waiting}
"""


def claim_statement(dialect: Dialect) -> sa.TextualSelect:
    """The claim's statement for a dialect (parameters ``window``, ``per_key``, ``limit``, ``busy_ids``
    and ``busy_keys``: the rows and keys of the store's open claims)."""
    now = str(models.utcnow().compile(dialect=dialect))
    postgres = dialect.name == "postgresql"
    rest = (_CLAIM_PG if postgres else _CLAIM_SQLITE).format(columns=_COLUMNS)
    not_busy = _NOT_BUSY_PG if postgres else _NOT_BUSY_SQLITE
    text = sa.text(_HEAD.format(now=now, not_busy=not_busy, not_waiting=_NOT_WAITING.format(now=now), rest=rest))
    if not postgres:
        text = text.bindparams(sa.bindparam("busy_ids", expanding=True), sa.bindparam("busy_keys", expanding=True))
    outbox = models.outbox.c
    return text.columns(
        outbox.id, outbox.message_id, outbox.topic, outbox.partition_key, outbox.headers,
        outbox.body, outbox.attempts, outbox.created_at, sa.column("rn", sa.Integer),
    )  # fmt: skip


def claim_driver_sql(dialect: Dialect) -> str:
    """The PostgreSQL claim as asyncpg SQL text: parameters ``$1`` window, ``$2`` per_key, ``$3`` limit,
    ``$4`` busy ids, ``$5`` busy keys.

    Columns as :func:`claim_statement`, ``headers`` as JSON text (see :func:`event_store.direct.claim_rows`).
    """
    text: str = claim_statement(dialect).element.text  # type: ignore[attr-defined]
    replaced = text.replace(":window", "$1").replace(":per_key", "$2").replace(":limit", "$3")
    return replaced.replace(":busy_ids", "$4").replace(":busy_keys", "$5")


def next_due_statement(dialect: Dialect) -> sa.TextualSelect:
    """``(earliest, now)``: when the earliest claimable row is due, and the database clock."""
    now = str(models.utcnow().compile(dialect=dialect))
    return sa.text(_NEXT_DUE.format(now=now, not_waiting=_NOT_WAITING.format(now=now))).columns(
        sa.column("earliest", sa.DateTime(timezone=True)), sa.column("now", sa.DateTime(timezone=True))
    )


ClaimRow = Sequence[Any]
"""A claimed row: ``(id, message_id, topic, partition_key, headers, body, attempts, created_at, rn)``,
headers decoded."""


def keep_key_prefixes(rows: Iterable[ClaimRow]) -> list[stores.OutboxMessage]:
    """Drop keyed rows whose key's earlier rows this claim did not get (another relay has them)."""
    last_rank: dict[str, int] = {}
    kept: list[stores.OutboxMessage] = []
    message = stores.OutboxMessage
    for row_id, message_id, topic, key, headers, body, attempts, created_at, rank in rows:
        if key is not None:
            if rank != last_rank.get(key, 0) + 1:
                last_rank[key] = -1_000_000  # a gap: nothing later of this key
                continue
            last_rank[key] = rank
        kept.append(message(row_id, message_id, topic, key, headers, body, attempts, as_utc(created_at)))
    return kept
