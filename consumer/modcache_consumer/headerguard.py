"""Message properties the AMQP client cannot decode reach the consumer as a marker, not a dead connection.

aio-pika's client (aiormq) decodes every frame with pamqp inside the connection's one reader task. pamqp decodes
a header table recursively (``field_table`` -> ``embedded_value`` -> ``field_table``, two Python frames a level),
and RabbitMQ does not bound how deep a producer nests one: a table 3,000 levels deep raises RecursionError in the
reader (attack-8b A4). The reader dies, the robust connection reconnects, the broker redelivers the unacknowledged
message, and the reader dies again, forever: the queue stops for every tenant. Invalid UTF-8 in a property, an
unknown field type or a timestamp out of range end the same way (pamqp raises, the reader dies).

``install`` changes two things in pamqp, once per process:

* nested tables and arrays deeper than ``MAX_DEPTH`` are refused while decoding (a ValueError, long before the
  interpreter's recursion limit), so no header is ever decoded, or handed on, deeper than that;
* a content-header frame whose properties fail to decode, for that or any other reason (including a RecursionError
  or a MemoryError), is decoded anyway: its frame envelope and body size are intact (the frame length says where it
  ends), so the connection carries on, and its properties are replaced by one header,
  ``UNDECODABLE_HEADER``, saying why. The consumer poisons such a message with that reason (``reason``), and the
  next message runs.

Only content-header frames are salvaged: a method or body frame that fails to decode is a broken connection
(the broker never sends one), and its error goes on as before.
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Callable, Mapping
from typing import Any

import pamqp.commands
import pamqp.constants
import pamqp.decode
import pamqp.exceptions
import pamqp.frame
import pamqp.header

from modcache import errors

#: The header a salvaged message carries instead of its properties: why they could not be decoded.
UNDECODABLE_HEADER = "x-modcache-undecodable-properties"
#: Nested tables/arrays in message properties deeper than this are refused (the body's limit is 32 as well).
MAX_DEPTH = 32

_Decoder = Callable[[bytes], tuple[int, Any]]
_lock = threading.Lock()
_depth = threading.local()
_installed: dict[str, Any] = {}


def install() -> None:
    """Guard pamqp's decoding in this process (idempotent)."""
    with _lock:
        if _installed:
            return
        _installed["unmarshal"] = pamqp.frame.unmarshal
        for code in (b"F", b"A"):
            _installed[code.decode()] = pamqp.decode.TABLE_MAPPING[code]
            pamqp.decode.TABLE_MAPPING[code] = _bounded(pamqp.decode.TABLE_MAPPING[code])
        setattr(pamqp.frame, "unmarshal", _unmarshal)  # noqa: B010  # aiormq calls pamqp.frame.unmarshal(...)


def uninstall() -> None:
    """Undo ``install`` (tests: what the client does without the guard)."""
    with _lock:
        if not _installed:
            return
        setattr(pamqp.frame, "unmarshal", _installed.pop("unmarshal"))  # noqa: B010
        for code in ("F", "A"):
            pamqp.decode.TABLE_MAPPING[code.encode()] = _installed.pop(code)


def reason(headers: Mapping[str, Any] | None) -> str | None:
    """Why a delivered message's properties were undecodable (it should be poisoned), or None if they were fine."""
    value = (headers or {}).get(UNDECODABLE_HEADER)
    return value if isinstance(value, str) else None


def _bounded(decode: _Decoder) -> _Decoder:
    def nested(value: bytes) -> tuple[int, Any]:
        depth: int = getattr(_depth, "value", 0)
        if depth >= MAX_DEPTH:
            raise ValueError(f"a table or array nested deeper than {MAX_DEPTH} levels")
        _depth.value = depth + 1
        try:
            return decode(value)
        finally:
            _depth.value = depth

    return nested


def _unmarshal(data_in: bytes) -> tuple[int, int, Any]:
    original = _installed["unmarshal"]
    try:
        return original(data_in)  # type: ignore[no-any-return]
    except Exception as e:  # RecursionError and MemoryError included: what failed was this frame's decoding
        salvaged = _salvage_header(data_in, e)
        if salvaged is None:
            raise
        return salvaged


def _salvage_header(data_in: bytes, error: Exception) -> tuple[int, int, pamqp.header.ContentHeader] | None:
    """The content header in ``data_in`` with its properties replaced by ``UNDECODABLE_HEADER``; None if
    ``data_in`` is not a complete, well-framed content header (then the failure is the connection's)."""
    frame_type, channel_id, frame_size = pamqp.frame.frame_parts(data_in)
    if frame_type != pamqp.constants.FRAME_HEADER or not frame_size:
        return None
    start = pamqp.constants.FRAME_HEADER_SIZE
    byte_count = start + frame_size + 1
    if byte_count > len(data_in) or data_in[byte_count - 1] != pamqp.constants.FRAME_END or frame_size < 12:
        return None
    _class_id, weight, body_size = struct.unpack(">HHQ", data_in[start : start + 12])
    cause = error.__cause__ if isinstance(error, pamqp.exceptions.UnmarshalingException) and error.__cause__ else error
    why = errors.truncate(f"message properties could not be decoded: {errors.describe(cause)}")
    properties = pamqp.commands.Basic.Properties(headers={UNDECODABLE_HEADER: why})
    return byte_count, channel_id, pamqp.header.ContentHeader(weight, body_size, properties)
