"""Handler registration (``@on``) and discovery of the application's modules.

``@on`` validates at import time and attaches a :class:`Handler` to the
function; it keeps no global state. :func:`discover` imports the modules named
in ``CONVEYOR_APP`` (and their submodules) and collects what they declare, so
a registry is always the explicit result of loading a list of modules.
"""

from __future__ import annotations

import collections.abc
import importlib
import inspect
import pkgutil
import sys
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from types import ModuleType
from typing import Any, TypeVar

from conveyor import errors, names, payloads, retry
from conveyor.sagas import definition as saga_definition
from conveyor.scheduling import schedules as scheduling

F = TypeVar("F", bound=Callable[..., Any])
_ATTRIBUTE = "__conveyor_handler__"


@dataclass(frozen=True, slots=True)
class Handler:
    """A registered handler.

    Attributes:
        name: stable dotted name; keys the subscription, the inbox and metrics.
        topic: the topic it consumes.
        func: the decorated function.
        decode: turns an envelope into the payload argument.
        takes_context: whether the function has a second (context) parameter.
        is_async: coroutine function (else run in a thread).
        retry: the retry policy.
        timeout: seconds a single attempt may take, or ``None``.
        concurrency: most messages handled at once by one worker process, or
            ``None`` for the worker's default.
        transactional: open the attempt's database transaction (inbox row
            first) before the handler runs, so a duplicate never runs it.
        plain: also accept messages that are not CloudEvents (a plain body from
            a producer without CloudEvents): the body is the payload and an
            envelope is synthesised around it (see :mod:`conveyor.plain`).
        batch: for a batch handler, most messages per call (``decode`` then
            decodes one element); ``None`` for one message per call.
        batch_wait: seconds a batch waits for more messages after its first.
        publishes: the topics it publishes to (``ctx.publish``), each with its
            payload type or ``None``, in declaration order; for the AsyncAPI
            document only (publishing elsewhere is not refused).
    """

    name: str
    topic: str
    func: Callable[..., Any] = field(repr=False)
    decode: payloads.Decoder = field(repr=False)
    takes_context: bool
    is_async: bool
    retry: retry.RetryPolicy
    timeout: float | None
    concurrency: int | None
    transactional: bool = False
    plain: bool = False
    batch: int | None = None
    batch_wait: float = 0.05
    publishes: tuple[tuple[str, Any], ...] = ()

    @property
    def where(self) -> str:
        """``module.function`` of the handler, for messages."""
        return f"{self.func.__module__}.{self.func.__qualname__}"


def on(
    topic: str,
    *,
    name: str | None = None,
    max_attempts: int = 5,
    timeout: timedelta | float | None = 30.0,
    concurrency: int | None = None,
    backoff: retry.RetryPolicy | None = None,
    transactional: bool = False,
    plain: bool = False,
    batch: int | None = None,
    batch_wait: timedelta | float = 0.05,
    publishes: Iterable[str] | Mapping[str, Any] = (),
) -> Callable[[F], F]:
    """Declare a handler for the messages of ``topic``.

    The decorated function takes the payload as its first parameter (its
    annotation says how to decode it) and, optionally, a
    :class:`~conveyor.Context` as its second. Coroutine functions run on the
    event loop; plain functions run in a worker thread.

    Args:
        topic: the topic to consume.
        name: stable dotted handler name (default ``module.function``). It
            keys the consumer group/queue/durable, the inbox and the metrics:
            renaming it is a migration, so set it explicitly.
        max_attempts: deliveries before the message is dead-lettered.
        timeout: longest a single attempt may run; a timeout counts as a failure.
        concurrency: most messages of this handler in flight per worker process.
        backoff: full retry policy; its ``max_attempts`` is replaced by ``max_attempts``.
        transactional: run the whole handler inside the attempt's database
            transaction, opened (inbox row first) before it is called: a
            duplicate delivery is acknowledged without running the handler at
            all. Without it the transaction opens at the first
            ``ctx.transaction()``. Needs an ``async def`` handler.
        plain: accept plain messages too, not only CloudEvents: a message with
            no CloudEvents attributes (a JSON body from FastStream, Node or a
            CDC connector) is handled with its body as the payload, in an
            envelope whose ``type`` is the topic, ``source``
            ``conveyor:plain:<broker>`` and ``id`` the broker's message id
            (see :mod:`conveyor.plain`). CloudEvents are decoded and
            validated as always.
        batch: make it a batch handler: an ``async def`` taking one
            ``list[X]`` parameter, called with up to ``batch`` payloads at once
            (see :mod:`conveyor.runtime.batching` for how each message is
            settled). Not transactional; batches of one handler run one at a
            time, so per-key order holds.
        batch_wait: longest a batch waits for more messages after its first one.
        publishes: the topics the handler publishes to (with ``ctx.publish``),
            as a list, or as a mapping of each topic to its payload type (a
            pydantic model, ``dict``...) or ``None``. The AsyncAPI document
            (``conveyor docs``, ``/docs``) lists them as the handler's ``send``
            operations; replies to a saga are found without it.

    Raises:
        ConfigurationError: invalid topic, published topic or name, a missing or unusable
            payload annotation, or ``transactional`` on a plain (sync)
            function; the message names the module and function.
    """

    def decorate(func: F) -> F:
        where = f"{func.__module__}.{func.__qualname__}"
        try:
            names.check("topic", topic)
            published = names.published(publishes)
            handler_name = names.check("handler name", name or _default_name(func))
            policy = _policy(backoff, max_attempts)
            seconds = retry.seconds(timeout)
            if seconds is not None and seconds <= 0:
                raise errors.ConfigurationError(f"timeout must be positive, got {timeout!r}")
            if concurrency is not None and concurrency < 1:
                raise errors.ConfigurationError(f"concurrency must be at least 1, got {concurrency}")
            annotation, takes_context = _payload_annotation(func, where)
            is_async = inspect.iscoroutinefunction(func)
            wait = retry.seconds(batch_wait) or 0.0
            if batch is not None:
                annotation = _batch_element(
                    annotation, batch, wait, is_async, takes_context, transactional, concurrency
                )
            decode = payloads.decoder_for(annotation, where)
            if transactional and not is_async:
                raise errors.ConfigurationError(
                    "transactional=True needs an `async def` handler: a plain function runs in a thread "
                    "and cannot share the attempt's database transaction"
                )
        except errors.ConfigurationError as exc:
            raise errors.ConfigurationError(f"handler {where}: {exc}") from None
        handler = Handler(
            name=handler_name,
            topic=topic,
            func=func,
            decode=decode,
            takes_context=takes_context,
            is_async=is_async,
            retry=policy,
            timeout=seconds,
            concurrency=concurrency,
            transactional=transactional,
            plain=plain,
            batch=batch,
            batch_wait=wait,
            publishes=published,
        )
        setattr(func, _ATTRIBUTE, handler)
        return func

    return decorate


MAX_BATCH = 10_000


def _batch_element(
    annotation: Any,
    batch: int,
    wait: float,
    is_async: bool,
    takes_context: bool,
    transactional: bool,
    concurrency: int | None,
) -> Any:
    """The element type of a batch handler's ``list[X]`` parameter, after checking the batch options."""
    if not 1 <= batch <= MAX_BATCH:
        raise errors.ConfigurationError(f"batch must be between 1 and {MAX_BATCH}, got {batch}")
    if not 0 <= wait <= 60:
        raise errors.ConfigurationError(f"batch_wait must be between 0 and 60 seconds, got {wait}")
    if not is_async:
        raise errors.ConfigurationError("a batch handler must be an `async def`")
    if takes_context or transactional:
        raise errors.ConfigurationError("a batch handler takes one parameter (the list) and is not transactional")
    if concurrency is not None:
        raise errors.ConfigurationError("a batch handler runs one batch at a time: leave concurrency unset")
    if typing.get_origin(annotation) not in (list, collections.abc.Sequence) or len(typing.get_args(annotation)) != 1:
        raise errors.ConfigurationError(f"a batch handler's parameter must be annotated list[X], not {annotation!r}")
    return typing.get_args(annotation)[0]


def _default_name(func: Callable[..., Any]) -> str:
    return f"{func.__module__}.{func.__name__}".lower().replace("_", "-")


def _policy(backoff: retry.RetryPolicy | None, max_attempts: int) -> retry.RetryPolicy:
    if backoff is None:
        return retry.RetryPolicy(max_attempts=max_attempts)
    return retry.RetryPolicy(
        max_attempts=max_attempts,
        initial_delay=backoff.initial_delay,
        max_delay=backoff.max_delay,
        multiplier=backoff.multiplier,
        jitter=backoff.jitter,
    )


def _payload_annotation(func: Callable[..., Any], where: str) -> tuple[Any, bool]:
    params = [
        p for p in inspect.signature(func).parameters.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    if not 1 <= len(params) <= 2:
        raise errors.ConfigurationError(
            f"a handler takes (payload) or (payload, ctx), but {where} takes {len(params)} parameters"
        )
    try:
        hints = typing.get_type_hints(func)
    except NameError as exc:
        raise errors.ConfigurationError(f"cannot resolve the annotations of {where}: {exc}") from exc
    annotation = hints.get(params[0].name)
    if annotation is None:
        raise errors.ConfigurationError(
            f"the payload parameter {params[0].name!r} has no type annotation; annotate it with "
            "a pydantic model, dict, str, bytes or Envelope"
        )
    return annotation, len(params) == 2


class Registry:
    """The handlers, schedules and sagas of one application, by name."""

    def __init__(self, handlers: Iterable[Handler] = (), schedules: Iterable[scheduling.Schedule] = ()) -> None:
        self._handlers: dict[str, Handler] = {}
        self._schedules: dict[str, scheduling.Schedule] = {}
        self._sagas: dict[str, saga_definition.Saga[Any]] = {}
        for handler in handlers:
            self.add(handler)
        for schedule in schedules:
            self.add_schedule(schedule)

    def add_schedule(self, schedule: scheduling.Schedule) -> None:
        """Add a schedule.

        Raises:
            ConfigurationError: another schedule already has this name.
        """
        _add_unique(self._schedules, schedule, "schedule")

    @property
    def schedules(self) -> list[scheduling.Schedule]:
        """Schedules in registration order."""
        return list(self._schedules.values())

    def schedule(self, name: str) -> scheduling.Schedule:
        """The schedule called ``name``.

        Raises:
            NotFound: no such schedule.
        """
        try:
            return self._schedules[name]
        except KeyError:
            known = ", ".join(self._schedules) or "none"
            raise errors.NotFound(f"no schedule named {name!r} (known: {known})") from None

    def add_saga(self, saga: saga_definition.Saga[Any]) -> None:
        """Add a saga and the handlers that run it (``sagas.<name>``, and ``sagas.<name>.start`` with ``start_on``).

        Raises:
            ConfigurationError: another saga has this name, or the saga is incomplete.
        """
        existing = self._sagas.get(saga.name)
        if existing is saga:
            return
        if existing is not None:
            raise errors.ConfigurationError(f"duplicate saga name {saga.name!r}: give each saga a unique name")
        from conveyor.sagas import runtime  # runtime builds handlers with @on

        for handler in runtime.handlers(saga):
            self.add(handler)
        self._sagas[saga.name] = saga

    @property
    def sagas(self) -> list[saga_definition.Saga[Any]]:
        """Sagas in registration order."""
        return list(self._sagas.values())

    def saga(self, name: str) -> saga_definition.Saga[Any]:
        """The saga called ``name``.

        Raises:
            NotFound: no such saga.
        """
        try:
            return self._sagas[name]
        except KeyError:
            known = ", ".join(self._sagas) or "none"
            raise errors.NotFound(f"no saga named {name!r} (known: {known})") from None

    def add(self, handler: Handler) -> None:
        """Add a handler.

        Raises:
            ConfigurationError: another handler already has this name.
        """
        _add_unique(self._handlers, handler, "handler")

    @property
    def handlers(self) -> list[Handler]:
        """Handlers in registration order."""
        return list(self._handlers.values())

    def topics(self) -> list[str]:
        """Every topic some handler consumes, without repeats."""
        return list(dict.fromkeys(h.topic for h in self._handlers.values()))

    @classmethod
    def of(cls, *funcs: Callable[..., Any] | saga_definition.Saga[Any]) -> Registry:
        """A registry of decorated functions and sagas (for tests and small programs).

        Raises:
            ConfigurationError: a function was not decorated with ``@on``.
        """
        registry = cls()
        for func in funcs:
            if isinstance(func, saga_definition.Saga):
                registry.add_saga(func)
                continue
            handler = getattr(func, _ATTRIBUTE, None)
            schedule = getattr(func, scheduling.ATTRIBUTE, None)
            if isinstance(handler, Handler):
                registry.add(handler)
            elif isinstance(schedule, scheduling.Schedule):
                registry.add_schedule(schedule)
            else:
                raise errors.ConfigurationError(f"{func!r} is not decorated with @on, @cron or @every")
        return registry


def _add_unique(table: dict[str, Any], item: Handler | scheduling.Schedule, kind: str) -> None:
    existing = table.get(item.name)
    if existing is not None and existing.func is not item.func:
        raise errors.ConfigurationError(
            f"duplicate {kind} name {item.name!r}: {existing.where} and {item.where}; give each {kind} a unique name="
        )
    table[item.name] = item


def discover(modules: Sequence[str], app_dir: str | None = None) -> Registry:
    """Import the application's modules and collect their handlers, schedules and sagas.

    Packages are walked: ``handlers`` loads ``handlers/billing.py`` and the rest.

    Args:
        modules: importable module or package names.
        app_dir: directory put first on ``sys.path`` (the project root).

    Raises:
        ConfigurationError: a module cannot be imported or declares an invalid
            or duplicate handler; the message names it.
    """
    if app_dir is not None and app_dir not in sys.path:
        sys.path.insert(0, app_dir)
    registry = Registry()
    for module in _import_all(modules):
        for value in list(vars(module).values()):
            if isinstance(value, saga_definition.Saga):
                registry.add_saga(value)  # the same saga imported elsewhere is added once
                continue
            if getattr(value, "__module__", None) != module.__name__:
                continue
            handler = getattr(value, _ATTRIBUTE, None)
            schedule = getattr(value, scheduling.ATTRIBUTE, None)
            if isinstance(handler, Handler):
                registry.add(handler)
            elif isinstance(schedule, scheduling.Schedule):
                registry.add_schedule(schedule)
    return registry


def _import_all(modules: Sequence[str]) -> list[ModuleType]:
    loaded: list[ModuleType] = []
    for name in modules:
        module = _import(name)
        loaded.append(module)
        if hasattr(module, "__path__"):
            for info in pkgutil.walk_packages(module.__path__, prefix=f"{name}."):
                loaded.append(_import(info.name))
    return loaded


def _import(name: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except errors.ConfigurationError:
        raise
    except ModuleNotFoundError as exc:
        if exc.name == name or name.startswith(f"{exc.name}."):
            raise errors.ConfigurationError(
                f"cannot import application module {name!r} (setting CONVEYOR_APP): no such module "
                f"on the path; run from the project directory or set CONVEYOR_APP"
            ) from exc
        raise errors.ConfigurationError(f"cannot import application module {name!r}: {exc}") from exc
    except Exception as exc:
        raise errors.ConfigurationError(f"cannot import application module {name!r}: {exc!r}") from exc
