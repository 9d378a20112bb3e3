"""End-to-end tests import their helpers from this folder.

The ``conveyor`` processes they start declare RabbitMQ queues named after the
tests' ``unique()`` names; those are deleted at the end of the session (see
:func:`conveyor.testing.brokers.delete_test_queues`).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
