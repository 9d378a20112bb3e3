"""Transports: one adapter module per broker client library, chosen by URL scheme."""

from __future__ import annotations

import importlib
from urllib.parse import urlsplit

from conveyor import errors, ports

# scheme -> (module, class, pip extra)
_SCHEMES: dict[str, tuple[str, str, str | None]] = {
    "memory": ("conveyor.transports.memory", "MemoryTransport", None),
    "kafka": ("conveyor.transports.kafka", "KafkaTransport", "kafka"),
    "amqp": ("conveyor.transports.rabbit", "RabbitTransport", "rabbit"),
    "amqps": ("conveyor.transports.rabbit", "RabbitTransport", "rabbit"),
    "nats": ("conveyor.transports.nats", "NatsTransport", "nats"),
}


def validate_url(url: str) -> str:
    """Check that a broker URL names a known scheme; return it.

    Raises:
        ConfigurationError: unknown scheme, naming the supported ones.
    """
    scheme = urlsplit(url).scheme
    if scheme not in _SCHEMES:
        known = ", ".join(f"{s}://" for s in _SCHEMES)
        raise errors.ConfigurationError(f"unsupported broker URL {url!r}: the scheme must be one of {known}")
    return url


def create(url: str) -> ports.Transport:
    """Build the transport for a broker URL (not yet connected).

    Raises:
        ConfigurationError: unknown scheme, or the client library is not installed.
    """
    module_name, class_name, extra = _SCHEMES[urlsplit(validate_url(url)).scheme]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.startswith("conveyor"):
            raise errors.ConfigurationError(f"no transport available for {url!r} in this version") from exc
        raise errors.ConfigurationError(
            f"broker URL {url!r} needs the {exc.name} package: pip install 'conveyor[{extra}]'"
        ) from exc
    transport: ports.Transport = getattr(module, class_name)(url)
    return transport


def publish_result(result: BaseException | None) -> Exception | None:
    """One ``publish_many`` result out of ``gather(..., return_exceptions=True)``.

    A :class:`~conveyor.errors.TransportError` is the message's verdict and is
    returned; anything else (a bug, a cancellation) propagates.
    """
    if result is None or isinstance(result, errors.TransportError):
        return result
    raise result
