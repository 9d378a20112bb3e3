"""Turning a message's data into the value a handler asked for.

The first parameter's annotation decides: a pydantic model (validated straight
from the JSON bytes), ``dict``/``list`` or any type pydantic can validate,
``str`` (UTF-8 text), ``bytes`` (raw) or :class:`~conveyor.envelope.Envelope`
(the whole event).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pydantic

from conveyor import envelope, errors

Decoder = Callable[[envelope.Envelope], Any]


def decoder_for(annotation: Any, where: str) -> Decoder:
    """Build the decoder for a payload annotation.

    Args:
        annotation: the handler's first parameter annotation.
        where: ``module.function``, for error messages.

    Raises:
        ConfigurationError: pydantic cannot build a validator for the type.
    """
    if annotation is bytes:
        return _raw
    if annotation is str:
        return _text
    if annotation is envelope.Envelope:
        return _whole
    if isinstance(annotation, type) and issubclass(annotation, pydantic.BaseModel):
        return _json_decoder(annotation.model_validate_json, annotation.__name__)
    try:
        adapter: pydantic.TypeAdapter[Any] = pydantic.TypeAdapter(annotation)
    except pydantic.PydanticSchemaGenerationError as exc:
        raise errors.ConfigurationError(
            f"{where}: cannot validate payloads of type {annotation!r}; annotate the first "
            "parameter with a pydantic model, dict, str, bytes or Envelope"
        ) from exc
    return _json_decoder(adapter.validate_json, getattr(annotation, "__name__", repr(annotation)))


def _raw(message: envelope.Envelope) -> bytes:
    return message.data


def _whole(message: envelope.Envelope) -> envelope.Envelope:
    return message


def _text(message: envelope.Envelope) -> str:
    try:
        return message.data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise errors.InvalidMessage(f"data is not valid UTF-8 text: {exc}") from exc


def _json_decoder(validate: Callable[[bytes], Any], type_name: str) -> Decoder:
    def decode(message: envelope.Envelope) -> Any:
        if not envelope.is_json(message.datacontenttype):
            raise errors.InvalidMessage(
                f"unsupported content type {message.datacontenttype!r}: {type_name} payloads must be JSON"
            )
        try:
            return validate(message.data)
        except pydantic.ValidationError as exc:
            raise errors.InvalidMessage(f"data does not validate as {type_name}: {_summary(exc)}") from exc

    return decode


def _summary(exc: pydantic.ValidationError) -> str:
    parts = []
    for error in exc.errors(include_url=False)[:5]:
        location = ".".join(str(p) for p in error["loc"]) or "(root)"
        parts.append(f"{location}: {error['msg']}")
    more = exc.error_count() - len(parts)
    return "; ".join(parts) + (f" (+{more} more)" if more > 0 else "")
