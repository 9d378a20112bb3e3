"""Options of the Kafka transport: the query parameters of a ``kafka://`` URL.

See :mod:`conveyor.transports.kafka` for what each option tunes.
"""

from __future__ import annotations

import dataclasses
from urllib.parse import parse_qsl, urlsplit

from conveyor import errors

_DEFAULT_PORT = 9092
MAX_REQUEST_BYTES = 1_048_576  # aiokafka's max_request_size, and Kafka's default message.max.bytes
_MAY_BE_ZERO = ("rebalance_timeout_ms", "idempotence", "revoke_grace_ms", "linger_ms")


@dataclasses.dataclass(frozen=True, slots=True)
class KafkaOptions:
    """Tuning of a :class:`KafkaTransport`; each field is also a URL query parameter.

    Attributes:
        partitions: partitions of topics this transport creates; at least the
            most replicas of any group, or the extra replicas sit idle.
        replication_factor: replication factor of topics this transport creates.
        session_timeout_ms: a member silent this long is dropped from its group.
        heartbeat_interval_ms: how often members heartbeat (well below the session timeout).
        max_poll_interval_ms: a member that does not poll this long leaves its
            group; the fetch loop keeps polling while handlers run.
        rebalance_timeout_ms: how long members get to rejoin during a rebalance
            (0 = the session timeout).
        fetch_max_wait_ms: how long a fetch waits on the broker for new records.
            Kafka answers as soon as records arrive; Tansu tends to wait it out,
            so it bounds delivery latency there (100 ms: ~25 ms median on Tansu,
            500 ms: ~200 ms). Raise it to cut idle fetch requests on Kafka.
        request_timeout_ms: limit of broker requests, sends and commits.
        idempotence: 1 for an idempotent producer (the default; needs a broker
            that supports ``InitProducerId``), 0 for a plain one.
        revoke_grace_ms: how long a member losing partitions waits for their
            deliveries to settle, and at most again for the commit, while the
            group waits (0 = a quarter of the rebalance timeout; must be under half).
        linger_ms: longest time a record waits in the producer for more records
            of its partition to share its request, while other publishes are
            queued behind it; a publish that nothing follows is sent at once
            (see :mod:`conveyor.transports.kafka_produce`). 0: never wait.
        max_batch_size: most bytes of records of one partition in one request
            (aiokafka's default is 16 KiB); concurrent publishes fill batches
            while the previous one is in flight. At most 1 MiB (a request's limit).

    Raises:
        ConfigurationError: ``revoke_grace_ms`` is half the rebalance timeout or
            more, or ``max_batch_size`` is over 1 MiB.
    """

    partitions: int = 8
    replication_factor: int = 1
    session_timeout_ms: int = 10_000
    heartbeat_interval_ms: int = 3_000
    max_poll_interval_ms: int = 300_000
    rebalance_timeout_ms: int = 0
    fetch_max_wait_ms: int = 100
    request_timeout_ms: int = 30_000
    idempotence: int = 1
    revoke_grace_ms: int = 0
    linger_ms: int = 5
    max_batch_size: int = 256 * 1024

    def __post_init__(self) -> None:
        if self.revoke_grace_ms * 2 >= self.rebalance_ms:
            text = f"Kafka option revoke_grace_ms={self.revoke_grace_ms} must be under half the rebalance timeout"
            raise errors.ConfigurationError(f"{text} ({self.rebalance_ms} ms)")
        if self.max_batch_size > MAX_REQUEST_BYTES:
            raise errors.ConfigurationError(
                f"Kafka option max_batch_size={self.max_batch_size} is over {MAX_REQUEST_BYTES}, the producer's "
                "request size limit: a full batch would be refused; lower it"
            )

    @property
    def rebalance_ms(self) -> int:
        """The rebalance timeout in effect (``rebalance_timeout_ms``, else the session timeout)."""
        return self.rebalance_timeout_ms or self.session_timeout_ms

    @property
    def revoke_grace(self) -> float:
        """The revocation grace in effect, in seconds."""
        return (self.revoke_grace_ms or self.rebalance_ms // 4) / 1000

    @classmethod
    def from_query(cls, query: str) -> KafkaOptions:
        """Parse URL query parameters.

        Raises:
            ConfigurationError: an unknown parameter or a value that is not a positive integer.
        """
        known = {f.name for f in dataclasses.fields(cls)}
        values: dict[str, int] = {}
        for name, raw in parse_qsl(query, keep_blank_values=True):
            if name not in known:
                raise errors.ConfigurationError(
                    f"unknown Kafka URL parameter {name!r}; known: {', '.join(sorted(known))}"
                )
            if not raw.isdigit() or (int(raw) == 0 and name not in _MAY_BE_ZERO):
                raise errors.ConfigurationError(f"Kafka URL parameter {name}={raw!r} must be a positive integer")
            if name == "idempotence" and raw not in ("0", "1"):
                raise errors.ConfigurationError(f"Kafka URL parameter idempotence={raw!r} must be 0 or 1")
            values[name] = int(raw)
        return cls(**values)


def parse_url(url: str) -> tuple[list[str], KafkaOptions]:
    """Bootstrap servers and options of a ``kafka://`` URL.

    Raises:
        ConfigurationError: not a ``kafka://host:port[,host:port]`` URL, or bad options.
    """
    parts = urlsplit(url)
    hosts = [h.strip() for h in parts.netloc.split(",") if h.strip()]
    if parts.scheme != "kafka" or not hosts or parts.path not in ("", "/"):
        raise errors.ConfigurationError(f"invalid Kafka URL {url!r}: expected kafka://host:port[,host:port]")
    servers = [h if ":" in h else f"{h}:{_DEFAULT_PORT}" for h in hosts]
    return servers, KafkaOptions.from_query(parts.query)
