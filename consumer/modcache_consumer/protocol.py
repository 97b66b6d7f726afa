"""The consumer <-> worker protocol: length-prefixed JSON frames over the worker's stdin/stdout pipes.

Light on purpose (the worker imports it): no asyncio, no SQLAlchemy. The worker moves the pipes to private
descriptors before any workflow code runs, so ``print`` in a workflow can never corrupt a frame.

Frames, in order:

* consumer -> worker ``Init`` (Redis URL, key prefix, limits, decryption keys: over the pipe, never the
  environment), worker -> consumer ``{"op": "ready", "pid"}``;
* per execution: consumer -> worker ``Job``; worker -> consumer any number of ``{"op": "repair", "paths"}``,
  each answered by ``{"op": "repaired", "error"}``; then worker -> consumer ``Result``;
* consumer -> worker ``{"op": "exit"}`` (or EOF) ends the worker.
"""

from __future__ import annotations

import json
import struct
from typing import IO, Any, NotRequired, TypedDict

HEADER = struct.Struct(">I")
MAX_FRAME_BYTES = 256 * 1024 * 1024


class Init(TypedDict):
    op: str
    redis_url: str
    key_prefix: str
    memory_limit_bytes: int | None
    max_result_bytes: int
    secret_keys: list[str]


class RawWorkflow(TypedDict):
    name: str
    path: str | None
    code: str
    function_name: str


class Job(TypedDict):
    op: str
    execution_id: str
    workflow: RawWorkflow
    parameters: dict[str, Any]
    config: dict[str, Any]
    organization: dict[str, Any] | None
    generation: int


class Result(TypedDict):
    op: str
    status: str  # SUCCESS or FAILED
    result: Any
    error: str | None
    timings_ms: dict[str, float]
    recycle: NotRequired[bool]  # the worker should not be reused (it ran out of memory)


class ProtocolError(Exception):
    """The peer sent something that is not a frame; the worker is not trusted any more."""


def encode(frame: dict[str, Any] | Init | Job | Result) -> bytes:
    body = json.dumps(frame, separators=(",", ":")).encode()
    return HEADER.pack(len(body)) + body


def decode(body: bytes) -> dict[str, Any]:
    try:
        frame = json.loads(body)
    except ValueError as e:
        raise ProtocolError(f"undecodable frame: {e}") from None
    if not isinstance(frame, dict) or "op" not in frame:
        raise ProtocolError("frame without op")
    return frame


def frame_length(header: bytes, *, limit: int = MAX_FRAME_BYTES) -> int:
    (length,) = HEADER.unpack(header)
    if length > limit:
        raise ProtocolError(f"frame of {length} bytes exceeds {limit}")
    return int(length)


# -- blocking side (the worker) ------------------------------------------------------------------------------


def read_frame(stream: IO[bytes]) -> dict[str, Any] | None:
    """The next frame, or None at EOF."""
    header = _read_exactly(stream, HEADER.size)
    if header is None:
        return None
    body = _read_exactly(stream, frame_length(header))
    if body is None:
        raise ProtocolError("EOF inside a frame")
    return decode(body)


def write_frame(stream: IO[bytes], frame: dict[str, Any] | Result) -> None:
    stream.write(encode(frame))
    stream.flush()


def _read_exactly(stream: IO[bytes], n: int) -> bytes | None:
    chunks, got = [], 0
    while got < n:
        chunk = stream.read(n - got)
        if not chunk:
            if got:
                raise ProtocolError("EOF inside a frame")
            return None
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)
