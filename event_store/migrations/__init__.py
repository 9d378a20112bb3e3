"""Alembic migrations of Conveyor's tables; run them with :func:`event_store.migrate.upgrade`."""
