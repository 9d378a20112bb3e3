"""The example application's cron jobs (declared with ``@cron``/``@every``)."""
