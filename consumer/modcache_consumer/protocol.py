"""Wire shapes between the consumer, the executor (``template``) and one execution (``runtime``).

Every frame is a 4-byte big-endian length and a JSON object with an ``op``. Light on purpose (the execution
imports it): no asyncio, no SQLAlchemy. Two kinds of connection:

**Control** (consumer <-> executor; one per consumer, a socketpair or the executor's Unix socket). Carries no
secret, no parameter and no result, so the template's memory, which every execution inherits, never holds one.

* executor -> consumer ``Hello`` on connect;
* executor -> consumer ``{"op": "spare", "pid"}`` with two descriptors attached (``SCM_RIGHTS``): the consumer's
  end of a fresh clone's channel and the read end of its output pipe. The clone never ran anything; it is
  blocked reading its channel. The executor keeps a couple of spares in each consumer's hands, so no clone is on
  the hot path;
* consumer -> executor ``{"op": "run", "ticket", "pid", "timeout_s", "grace_s"}`` once it wrote a job on that
  spare's channel: the deadline starts (SIGTERM at ``timeout_s``, SIGKILL ``grace_s`` later); executor ->
  consumer ``Exited`` when the process is gone (its whole PID namespace with it);
* consumer -> executor ``{"op": "stop", "ticket"}`` ends an execution early (a broken channel, a cancelled
  message); ``Learned`` hands the template verified workspace modules to compile and keep (public code any
  execution may import, cached by content hash), followed by ``{"op": "spares", "dropped": [pid, ...]}``: the
  consumer closed the spares it held (cloned from the old memory) and gets new ones.

**Channel** (consumer <-> one execution, a socketpair of its own). Consumer -> execution ``Job`` (with the
limits the clone applies before any of it runs); execution -> consumer requests (``lookup``, ``manifest``,
``directory``, ``repair``, ``secret``), each answered by one ``{"op": "answer", ...}``; then execution ->
consumer exactly one ``Result``. Workflow code can reach its own channel descriptor, so the consumer trusts
nothing on it beyond that execution: a garbage, oversized or second result frame fails only this execution.
After its result the runtime shuts the socket for writing (every descriptor of it), so the consumer has its
EOF at once and nothing can follow the result.
"""

from __future__ import annotations

import json
import socket
import struct
from typing import Any, NotRequired, TypedDict

HEADER = struct.Struct(">I")
MAX_CONTROL_FRAME_BYTES = 64 * 1024**2
MAX_REQUEST_BYTES = 1024**2  # an execution's requests (not its result) stay below this
#: What the template compiles and keeps (attack-8c C1): it compiles in its only control loop and every clone
#: inherits what it holds, so no module above MAX_TAUGHT_MODULE_BYTES is taught (an execution that imports one
#: gets it over its channel and compiles it itself, against its own limits), one lesson carries at most
#: MAX_LESSON_SOURCE_BYTES of source (one lesson's compile stays short; the rest follows in later lessons), and
#: the compiled-code cache holds code of at most MAX_CODE_CACHE_SOURCE_BYTES of source, least recently used first out.
MAX_TAUGHT_MODULE_BYTES = 256 * 1024
MAX_LESSON_SOURCE_BYTES = 1024**2
MAX_CODE_CACHE_SOURCE_BYTES = 8 * 1024**2


class Exited(TypedDict):
    op: str
    ticket: int
    pid: int
    returncode: int
    timed_out: bool
    stopped: bool  # the executor signalled it (deadline or stop frame)


class RawEntry(TypedDict):
    """One candidate path of a lookup, as the consumer verified it (``content`` None: absent or corrupt)."""

    path: str
    content: str | None
    hash: str | None
    manifest_generation: int | None
    manifest_hash: str | None
    indexed: bool


class Learned(TypedDict):
    op: str
    generation: int
    lookups: list[list[Any]]  # [[candidate, ...], [RawEntry, ...]]
    directories: NotRequired[list[list[Any]]]  # [[rel, is a directory of an indexed path], ...]


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
    config: dict[str, Any]  # secret values are withheld: {"type": "secret"}; asked for with a "secret" request
    organization: dict[str, Any] | None
    generation: int
    attempt: NotRequired[int]  # which run of the execution this is: 1 first, 2 the first retry after a crash
    max_result_bytes: NotRequired[int]
    limits: NotRequired[dict[str, int | None]]  # memory_bytes, processes, file_bytes, tmp_bytes


class Result(TypedDict):
    op: str
    status: str  # SUCCESS or FAILED
    result: Any
    error: str | None
    timings_ms: dict[str, float]


class ProtocolError(Exception):
    """The peer sent something that is not a frame; it is not trusted any more."""


def encode(frame: Any) -> bytes:
    body = json.dumps(frame, separators=(",", ":")).encode()
    return HEADER.pack(len(body)) + body


def decode(body: bytes) -> dict[str, Any]:
    try:
        frame = json.loads(body)
    except (ValueError, RecursionError) as e:
        raise ProtocolError(f"undecodable frame: {type(e).__name__}") from None
    if not isinstance(frame, dict) or not isinstance(frame.get("op"), str):
        raise ProtocolError("frame without op")
    return frame


def frame_length(header: bytes, *, limit: int) -> int:
    (length,) = HEADER.unpack(header)
    if length > limit:
        raise ProtocolError(f"frame of {length} bytes exceeds {limit}")
    return int(length)


class Frames:
    """Incremental decoding of a byte stream into frames (the template's non-blocking reads)."""

    def __init__(self, *, limit: int) -> None:
        self._buffer = bytearray()
        self._limit = limit

    @property
    def pending(self) -> bool:
        """Part of a frame was fed and not completed yet."""
        return bool(self._buffer)

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        self._buffer += data
        frames = []
        while len(self._buffer) >= HEADER.size:
            length = frame_length(bytes(self._buffer[: HEADER.size]), limit=self._limit)
            if len(self._buffer) < HEADER.size + length:
                break
            frames.append(decode(bytes(self._buffer[HEADER.size : HEADER.size + length])))
            del self._buffer[: HEADER.size + length]
        return frames


# -- blocking side (the execution) ---------------------------------------------------------------------------


class Channel:
    """The execution's end of its channel: blocking request/answer."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._reader = sock.makefile("rb")

    def send(self, frame: Any) -> None:
        self._sock.sendall(encode(frame))

    def receive(self) -> dict[str, Any] | None:
        header = self._reader.read(HEADER.size)
        if not header:
            return None
        if len(header) < HEADER.size:
            raise ProtocolError("EOF inside a frame")
        length = frame_length(header, limit=MAX_CONTROL_FRAME_BYTES)
        body = self._reader.read(length)
        if len(body) < length:
            raise ProtocolError("EOF inside a frame")
        return decode(body)

    def finish(self) -> None:
        """Shut the socket for writing (for every descriptor of it, a workflow's copies included)."""
        self._sock.shutdown(socket.SHUT_WR)

    def ask(self, request: dict[str, Any]) -> dict[str, Any]:
        """Send a request and return its answer; the consumer going away ends the execution."""
        self.send(request)
        answer = self.receive()
        if answer is None or answer.get("op") != "answer":
            raise SystemExit("modcache: the consumer closed this execution's channel")
        return answer
