"""eventsourcing's own recorder test cases, run against event_store.eventsourcing_recorder.

Each test gets a fresh migrated database (notification ids start at 1), on
SQLite and on PostgreSQL.
"""

from __future__ import annotations

import os
import time
from typing import ClassVar

import databases
import pytest
from eventsourcing.application import Application
from eventsourcing.domain import Aggregate, event
from eventsourcing.persistence import AggregateRecorder, ApplicationRecorder, ProcessRecorder, TrackingRecorder
from eventsourcing.tests import persistence as cases

from event_store import eventsourcing_recorder as recorder_module

_PG_REACHABLE: list[bool] = []


def _require(kind: str) -> None:
    if kind != "postgres":
        return
    if not _PG_REACHABLE:
        from conveyor.testing import brokers

        brokers.require_service("PostgreSQL", "127.0.0.1", 5432)
        _PG_REACHABLE.append(True)


class _OnFreshDatabase:
    """Mixin: create_recorder() builds a recorder on a fresh database; cleanup drops it."""

    kind: ClassVar[str]

    def _datastore(self) -> recorder_module.Datastore:
        _require(self.kind)
        url = databases.create(self.kind)
        datastore = recorder_module.Datastore(url, create_table=False)

        def cleanup() -> None:
            # Some cases leave reader threads running (not joined) at the end
            # of the test: let them return their connections before closing.
            deadline = time.monotonic() + 5.0
            while datastore.engine.pool.checkedout() and time.monotonic() < deadline:  # type: ignore[attr-defined]
                time.sleep(0.01)
            datastore.close()
            leaked = databases.open_connections(url)
            databases.drop(url)
            assert leaked == 0, f"{leaked} connection(s) left open"

        self.addCleanup(cleanup)  # type: ignore[attr-defined]
        return datastore


def _make(kind: str) -> list[type]:
    class Aggregates(_OnFreshDatabase, cases.AggregateRecorderTestCase):
        def create_recorder(self) -> AggregateRecorder:
            return recorder_module.SqlAggregateRecorder(self._datastore())

    class Snapshots(_OnFreshDatabase, cases.AggregateRecorderTestCase):
        def create_recorder(self) -> AggregateRecorder:
            from event_store import models

            return recorder_module.SqlAggregateRecorder(self._datastore(), models.snapshots)

    class Applications(_OnFreshDatabase, cases.ApplicationRecorderTestCase):
        def create_recorder(self) -> ApplicationRecorder:
            return recorder_module.SqlApplicationRecorder(self._datastore())

        def test_insert_subscribe(self) -> None:
            self.optional_test_insert_subscribe()

    class Tracking(_OnFreshDatabase, cases.TrackingRecorderTestCase):
        def create_recorder(self) -> TrackingRecorder:
            return recorder_module.SqlTrackingRecorder(self._datastore())

    class Processes(_OnFreshDatabase, cases.ProcessRecorderTestCase):
        def create_recorder(self) -> ProcessRecorder:
            return recorder_module.SqlProcessRecorder(self._datastore())

    class NonInterleaving(_OnFreshDatabase, cases.NonInterleavingNotificationIDsBaseCase):
        def create_recorder(self) -> ApplicationRecorder:
            return recorder_module.SqlApplicationRecorder(self._datastore())

    made: list[type] = []
    for cls in (Aggregates, Snapshots, Applications, Tracking, Processes, NonInterleaving):
        cls.kind = kind
        cls.__name__ = cls.__qualname__ = f"Test{cls.__name__}{kind.capitalize()}"
        made.append(cls)
    return made


(
    TestAggregatesSqlite, TestSnapshotsSqlite, TestApplicationsSqlite,
    TestTrackingSqlite, TestProcessesSqlite, TestNonInterleavingSqlite,
) = _make("sqlite")  # fmt: skip
(
    TestAggregatesPostgres, TestSnapshotsPostgres, TestApplicationsPostgres,
    TestTrackingPostgres, TestProcessesPostgres, TestNonInterleavingPostgres,
) = _make("postgres")  # fmt: skip


class Account(Aggregate):
    @event("Opened")
    def __init__(self, owner: str) -> None:
        self.owner = owner
        self.balance = 0

    @event("Credited")
    def credit(self, amount: int) -> None:
        self.balance += amount


def test_application_with_persistence_module_stores_aggregates(db_kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    url = databases.create(db_kind)
    env = {
        "PERSISTENCE_MODULE": "event_store.eventsourcing_recorder",
        "CONVEYOR_DATABASE_URL": url,
        "IS_SNAPSHOTTING_ENABLED": "yes",
    }
    try:
        app = Application(env=env)
        account = Account("ada")
        account.credit(30)
        app.save(account)
        app.take_snapshot(account.id)
        copy = Application(env=env)
        loaded = copy.repository.get(account.id)
        notifications = copy.recorder.select_notifications(start=None, limit=10)
        app.close()
        copy.close()
    finally:
        leaked = databases.open_connections(url)
        databases.drop(url)
    assert (loaded.owner, loaded.balance, len(notifications), leaked) == ("ada", 30, 2, 0)
    assert "POSTGRES_ENABLE_DB_FUNCTIONS" not in os.environ


def test_datastore_unmigrated_database_refused_when_create_table_false(db_kind: str) -> None:
    from conveyor import errors

    url = databases.create_empty(db_kind)
    try:
        with pytest.raises(errors.ConfigurationError, match="not migrated"):
            recorder_module.Datastore(url, create_table=False)
    finally:
        databases.drop(url)
