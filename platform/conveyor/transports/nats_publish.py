"""Pipelined JetStream publishing: many publishes in flight on one connection, each PubAck matched to its future.

nats-py's ``publish_async`` does the same, but spends more per message than
the message costs to send (a ``wait_for`` around a semaphore, random token
bytes, a done callback). Here a publish is one PUB with a reply subject
``<inbox>.<n>`` (``n`` a counter) and one future; the PubAcks come to one
subscription on ``<inbox>.*``. The caller bounds how long it waits (and so
how many are in flight); a future it gives up on is dropped with :meth:`forget`.
"""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

import nats.js.errors
import orjson
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import api

_NO_RESPONDERS = "503"


class PubAcks:
    """The PubAck futures of the publishes in flight on one connection.

    Args:
        nc: a connected nats-py client (its reply subscription survives reconnects).
    """

    def __init__(self, nc: Client) -> None:
        self._nc = nc
        self._prefix = ""
        self._futures: dict[str, asyncio.Future[None]] = {}
        self._tokens = itertools.count()
        self._subscribed: asyncio.Future[None] | None = None

    async def send(self, subject: str, body: bytes, headers: dict[str, str] | None) -> tuple[str, asyncio.Future[None]]:
        """Publish; the returned future resolves with the PubAck (or the server's refusal).

        Returns:
            The token to :meth:`forget` the future by, and the future.

        Raises:
            nats.errors.Error: the client could not send (closed, payload too large, ...).
        """
        if not self._prefix:
            await self._subscribe()
        token = f"{self._prefix}{next(self._tokens):x}"
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._futures[token] = future
        try:
            await self._nc.publish(subject, body, reply=token, headers=headers)
        except BaseException:
            del self._futures[token]
            raise
        return token, future

    def forget(self, token: str) -> None:
        """Drop a future the caller no longer waits for (a late PubAck is then ignored)."""
        future = self._futures.pop(token, None)
        if future is not None and not future.done():
            future.cancel()

    async def _subscribe(self) -> None:
        if self._subscribed is None:  # concurrent first publishes subscribe once
            self._subscribed = asyncio.get_running_loop().create_future()
            try:
                prefix = f"{self._nc.new_inbox()}."
                await self._nc.subscribe(f"{prefix}*", cb=self._on_reply)
            except BaseException as exc:
                self._subscribed.set_exception(exc)
                self._subscribed.exception()  # retrieved: raised here, not when collected
                self._subscribed = None
                raise
            self._prefix = prefix
            self._subscribed.set_result(None)
        else:
            await asyncio.shield(self._subscribed)

    async def _on_reply(self, msg: Msg) -> None:
        future = self._futures.pop(msg.subject, None)
        if future is None or future.done():
            return
        try:
            refusal = refusal_of(msg)
        except Exception as exc:  # an answer we cannot read still settles its publish
            future.set_exception(nats.js.errors.Error(f"unreadable PubAck {msg.data[:200]!r}: {exc!r}"))
            return
        if refusal is None:
            future.set_result(None)
        else:
            future.set_exception(refusal)


def refusal_of(msg: Msg) -> Exception | None:
    """None for a PubAck, else the exception of the reply that is not one: no stream, or the server's error.

    The reply is parsed, never searched: a PubAck is ``{"stream": ..., "seq": ...}``
    and a refusal ``{"error": {...}}``, and a stream (or domain) may well be
    named ``error``. ``APIError.from_error`` *raises* the error it builds (so
    nats-py's own ``publish_async`` leaves a refused publish waiting until it
    times out).

    Raises:
        orjson.JSONDecodeError: the reply is not JSON.
    """
    if msg.headers and msg.headers.get(api.Header.STATUS) == _NO_RESPONDERS:
        return nats.js.errors.NoStreamResponseError()
    reply: Any = orjson.loads(msg.data)
    if not isinstance(reply, dict):
        return nats.js.errors.Error(f"unexpected PubAck {msg.data[:200]!r}")
    if "error" not in reply:
        if isinstance(reply.get("stream"), str) and isinstance(reply.get("seq"), int):
            return None
        return nats.js.errors.Error(f"unexpected PubAck {msg.data[:200]!r}")
    if not isinstance(reply["error"], dict):
        return nats.js.errors.Error(f"the server refused the message: {reply['error']!r}")
    try:
        nats.js.errors.APIError.from_error(reply["error"])
    except nats.js.errors.Error as exc:
        return exc
    except (KeyError, TypeError):  # an error without the fields nats-py expects
        pass
    return nats.js.errors.Error(f"the server refused the message: {reply['error']!r}")
