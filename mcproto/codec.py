"""One codec for every coordination message: pydantic model <-> msgpack bytes.

Pure: no I/O.  Decoding untrusted bytes is bounded: the size is checked before
msgpack sees the data, msgpack itself is limited, the ``type`` tag and
``version`` are checked before validation, and the model forbids unknown
fields.  Whatever goes wrong, the caller gets exactly one error type,
:class:`~mcproto.errors.MessageError`, with a one-line reason.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

import msgpack
from pydantic import ValidationError

from mcproto import PROTOCOL_VERSION
from mcproto.errors import MessageError
from mcproto.messages import ALL_MESSAGES, SESSION_PLANE, Message

M = TypeVar("M", bound=Message)

# A session-plane datagram must fit one unfragmented UDP datagram on a
# 1,500-byte link: 1,500 - 20 (IPv4) - 8 (UDP) = 1,472; we keep 1,400 for IPv6
# headers and tunnels.
MAX_DATAGRAM_BYTES = 1400
# Task bodies can be larger: a session job carries the image's signed manifest (at most
# 65,536 chunk digests, ~1.4 MB in base64; see mcproto.manifest); everything else is small.
MAX_BODY_BYTES = 3 * 1024 * 1024

_BY_TYPE: dict[str, type[Message]] = {
    m.model_fields["type"].default: m for m in ALL_MESSAGES
}


def _summarize(exc: ValidationError) -> str:
    """One line out of a pydantic error: the first problem and how many more."""
    errors = exc.errors(include_url=False)
    first = errors[0]
    where = ".".join(str(p) for p in first.get("loc", ())) or "message"
    more = f" (+{len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{where}: {first.get('msg', 'invalid')}{more}"


def validate(data: Any, allowed: Iterable[type[M]] | None = None) -> M:
    """Turn a decoded mapping into a model, checking type tag, version and fields.

    ``allowed`` restricts which message types the caller accepts (a DP control
    port accepts only client -> DP messages).  Raises :class:`MessageError`.
    """
    if not isinstance(data, Mapping):
        raise MessageError(f"expected a map, got {type(data).__name__}")
    tag = data.get("type")
    if not isinstance(tag, str) or tag not in _BY_TYPE:
        raise MessageError(f"unknown message type {tag!r}"[:200])
    model = _BY_TYPE[tag]
    if allowed is not None:
        allowed_t = tuple(allowed)
        if model not in allowed_t:
            raise MessageError(f"message type {tag!r} not accepted here")
    version = data.get("version", PROTOCOL_VERSION)
    if version != PROTOCOL_VERSION:
        raise MessageError(f"unsupported protocol version {version!r} (we speak {PROTOCOL_VERSION})"[:200])
    try:
        return model.model_validate(dict(data))  # type: ignore[return-value]
    except ValidationError as exc:
        raise MessageError(f"invalid {tag}: {_summarize(exc)}") from None


def encode(msg: Message, max_size: int = MAX_DATAGRAM_BYTES) -> bytes:
    """Serialize a message to msgpack; refuses to produce more than ``max_size`` bytes."""
    # Python mode keeps ``bytes`` fields binary (msgpack bin), which JSON mode would turn into text.
    data = msgpack.packb(msg.model_dump(), use_bin_type=True)
    if len(data) > max_size:
        raise MessageError(f"{msg.type} message is {len(data)} bytes, limit {max_size}")  # type: ignore[attr-defined]
    return data


def decode(
    data: bytes | bytearray | memoryview,
    allowed: Iterable[type[M]] | None = SESSION_PLANE,  # type: ignore[assignment]
    max_size: int = MAX_DATAGRAM_BYTES,
) -> M:
    """Parse untrusted msgpack bytes into a validated message, or raise MessageError."""
    if len(data) > max_size:
        raise MessageError(f"message of {len(data)} bytes exceeds limit {max_size}")
    if not data:
        raise MessageError("empty message")
    try:
        obj = msgpack.unpackb(
            bytes(data),
            raw=False,
            strict_map_key=True,
            max_str_len=max_size,
            max_bin_len=max_size,
            max_array_len=1024,
            max_map_len=64,
            max_ext_len=0,
        )
    except (msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
        raise MessageError(f"malformed msgpack: {type(exc).__name__}") from None
    except (ValueError, TypeError, OverflowError) as exc:
        raise MessageError(f"malformed msgpack: {exc}"[:200]) from None
    return validate(obj, allowed)


def to_body(msg: Message) -> dict[str, Any]:
    """A model as a plain JSON-compatible dict for a Celery task body."""
    body = msg.model_dump(mode="json")
    size = len(msgpack.packb(body, use_bin_type=True))
    if size > MAX_BODY_BYTES:
        raise MessageError(f"{msg.type} body is {size} bytes, limit {MAX_BODY_BYTES}")  # type: ignore[attr-defined]
    return body


def from_body(model: type[M], body: Any) -> M:
    """Validate a Celery task body (already msgpack-decoded by Celery) as ``model``."""
    try:
        size = len(msgpack.packb(body, use_bin_type=True))
    except (TypeError, ValueError, OverflowError) as exc:
        raise MessageError(f"task body is not plain data: {exc}"[:200]) from None
    if size > MAX_BODY_BYTES:
        raise MessageError(f"task body is {size} bytes, limit {MAX_BODY_BYTES}")
    return validate(body, (model,))
