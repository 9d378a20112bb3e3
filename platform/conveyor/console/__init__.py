"""The operations console: server-rendered pages under ``/console``, served by ``conveyor run`` and ``serve``.

Pages: the overview (handlers' rates, errors, durations, load and backlog;
relay; dead letters; next cron fires; sagas), dead letters (browse without
consuming, replay, purge), the outbox (parked rows: retry, purge), schedules
(pause, resume, trigger now) and sagas (timeline, retry, abort). Who may do
what is decided in :mod:`conveyor.console.auth`; every input is checked in
:mod:`conveyor.console.inputs`. Jinja2 templates (autoescaped) and a small
script for live refresh and local times; nothing is loaded from elsewhere.
"""
