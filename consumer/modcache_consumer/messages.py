"""The wire shapes of the execution queue, and the rules that judge a message. Pure: no I/O, no clock.

A request is JSON ``{"execution_id": uuid, "workflow_id": uuid, "organization_id": uuid | null,
"parameters": {...}}``; callers that wait set the AMQP ``reply_to`` and ``correlation_id`` properties and get a
``RawReply``. ``parse`` returns an ``ExecutionRequest`` or raises ``Malformed`` with a reason a person can act
on (it goes into the poison queue's reason header), never echoing the body.

Messages come from producers we do not trust, so ``parse`` bounds a body *before* handing it to ``json.loads``
(``prescan``): its size, NUL bytes, how deep arrays and objects nest, and how many digits a number has. Without
that, 200 KB of ``[`` raises ``RecursionError`` and a 5,000-digit integer ``ValueError`` out of the parser (Python
caps int conversion at 4,300 digits), and deep ``parameters`` break every later recursive walk (``has_nul``,
``json.dumps``, asyncpg's jsonb encoder). Each check is a C-speed pass over the bytes, so even a hostile body at
the size limit costs a bounded fraction of a second.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
import re
import uuid
from collections.abc import Iterator
from typing import Any, NewType, TypedDict

from modcache import errors

ExecutionId = NewType("ExecutionId", uuid.UUID)
WorkflowId = NewType("WorkflowId", uuid.UUID)
OrganizationId = NewType("OrganizationId", uuid.UUID)

MAX_BODY_BYTES = 1024 * 1024
MAX_DEPTH = 32
MAX_NUMBER_DIGITS = 100
MAX_ERROR_CHARS = 4000  # an execution's error message (the runtime truncates its tracebacks to this)

# A JSON string, its closing quote optional so an unterminated one swallows the rest; possessive quantifiers
# (Python >= 3.11) keep the regex linear on hostile input (no backtracking into ``\\`` runs).
_STRING = re.compile(rb'"(?:[^"\\]++|\\.)*+"?', re.DOTALL)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_SQUARE = bytes.maketrans(b"{}", b"[]")
_DIGITS_ONLY = bytes(0x39 if 0x30 <= b <= 0x39 else 0x20 for b in range(256))  # digits -> "9", the rest -> " "


class Status(enum.StrEnum):
    PENDING = "PENDING"
    RUNNING = "RUNNING"
    SUCCESS = "SUCCESS"
    FAILED = "FAILED"
    TIMEOUT = "TIMEOUT"

    @property
    def finished(self) -> bool:
        return self in (Status.SUCCESS, Status.FAILED, Status.TIMEOUT)


UNFINISHED = (Status.PENDING.value, Status.RUNNING.value)


class RawExecutionRequest(TypedDict, total=False):
    execution_id: str
    workflow_id: str
    organization_id: str | None
    parameters: dict[str, Any]


class RawReply(TypedDict):
    execution_id: str
    status: str
    result: Any
    error: str | None
    duration_ms: int | None


@dataclasses.dataclass(frozen=True)
class Limits:
    """What a body may hold before it is parsed (``MODCACHE_MAX_MESSAGE_*``)."""

    max_bytes: int = MAX_BODY_BYTES
    max_depth: int = MAX_DEPTH
    max_number_digits: int = MAX_NUMBER_DIGITS


class Malformed(errors.InputError):
    """A message that can never be executed as sent; ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__("message", reason)


@dataclasses.dataclass(frozen=True)
class ExecutionRequest:
    execution_id: ExecutionId
    workflow_id: WorkflowId
    organization_id: OrganizationId | None = None
    parameters: dict[str, Any] = dataclasses.field(default_factory=dict)
    reply_to: str | None = None
    correlation_id: str | None = None

    def to_raw(self) -> RawExecutionRequest:
        return {
            "execution_id": str(self.execution_id),
            "workflow_id": str(self.workflow_id),
            "organization_id": str(self.organization_id) if self.organization_id else None,
            "parameters": self.parameters,
        }

    def encode(self) -> bytes:
        return json.dumps(self.to_raw()).encode()


@dataclasses.dataclass(frozen=True)
class Outcome:
    """How an execution ended: what is recorded in ``executions`` and sent to ``reply_to``."""

    status: Status
    result: Any = None
    error: str | None = None
    duration_ms: int | None = None

    def reply(self, execution_id: uuid.UUID) -> RawReply:
        return {
            "execution_id": str(execution_id),
            "status": self.status.value,
            "result": self.result,
            "error": self.error,
            "duration_ms": self.duration_ms,
        }


def storable_text(text: str | None) -> str | None:
    """``text`` with NULs and unpaired surrogates escaped (``\\x00``, ``\\udcff``), as PostgreSQL can store it."""
    if text is None:
        return None
    if not isinstance(text, str):
        return repr(text)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text.replace("\x00", "\\x00") if "\x00" in text else text


def parse(
    body: bytes, *, reply_to: str | None = None, correlation_id: str | None = None, limits: Limits = Limits()
) -> ExecutionRequest:
    """The request in ``body``, or Malformed saying what is wrong with it."""
    prescan(body, limits)
    try:
        data = json.loads(body.decode("utf-8"), parse_constant=_not_a_number, parse_float=_finite)
    except UnicodeDecodeError:
        raise Malformed("body is not UTF-8") from None
    except json.JSONDecodeError as e:
        raise Malformed(f"body is not JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    if not isinstance(data, dict):
        raise Malformed(f"body must be a JSON object, not {type(data).__name__}")
    parameters = data.get("parameters", {})
    if parameters is None:
        parameters = {}
    if not isinstance(parameters, dict):
        raise Malformed("parameters: must be an object")
    if has_nul(parameters):
        raise Malformed("parameters: a string holds a NUL character (\\u0000), which PostgreSQL cannot store")
    if has_lone_surrogate(parameters):
        raise Malformed("parameters: a string holds an unpaired surrogate (\\ud800-\\udfff), which is not Unicode")
    org = data.get("organization_id")
    return ExecutionRequest(
        execution_id=ExecutionId(_uuid(data, "execution_id")),
        workflow_id=WorkflowId(_uuid(data, "workflow_id")),
        organization_id=OrganizationId(_uuid(data, "organization_id")) if org is not None else None,
        parameters=parameters,
        reply_to=reply_to or None,
        correlation_id=correlation_id or None,
    )


def _not_a_number(constant: str) -> float:
    raise Malformed(f"body holds {constant}, which is not JSON and which PostgreSQL cannot store")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise Malformed(f"body holds the number {text[:40]}, too large for a float (it would be infinite)")
    return value


def decode_reply(body: bytes) -> RawReply:
    data = json.loads(body)
    if not isinstance(data, dict) or "status" not in data:
        raise ValueError("not an execution reply")
    return RawReply(
        execution_id=str(data["execution_id"]),
        status=str(data["status"]),
        result=data.get("result"),
        error=data.get("error"),
        duration_ms=data.get("duration_ms"),
    )


def prescan(body: bytes, limits: Limits) -> None:
    """Raise Malformed if ``body`` breaks a limit; what passes is safe for ``json.loads`` and recursive walks."""
    if len(body) > limits.max_bytes:
        raise Malformed(f"body is larger than {limits.max_bytes} bytes (MODCACHE_MAX_MESSAGE_BYTES)")
    nul = body.find(b"\x00")
    if nul >= 0:
        raise Malformed(f"body holds a NUL byte at offset {nul}")
    structure = _STRING.sub(b'""', body)  # what is left outside strings: brackets, numbers, literals, separators
    if deeper_than(structure, limits.max_depth):
        raise Malformed(f"body nests arrays/objects deeper than {limits.max_depth} levels (MODCACHE_MAX_MESSAGE_DEPTH)")
    if b"9" * (limits.max_number_digits + 1) in structure.translate(_DIGITS_ONLY):  # a substring search, no regex
        raise Malformed(
            f"a number has more than {limits.max_number_digits} digits (MODCACHE_MAX_MESSAGE_NUMBER_DIGITS)"
        )


def deeper_than(structure: bytes, max_depth: int) -> bool:
    """Whether ``[``/``{`` nest deeper than ``max_depth`` in ``structure`` (JSON with its strings emptied).

    Brackets only, then at most ``max_depth`` passes that each remove every adjacent ``[]``: a pass lowers every
    nest by exactly one level, so a balanced body is gone after ``max_depth`` passes unless it nests deeper.
    What can remain otherwise is ``]]]...[[[``: closers the parser fails on before recursing, and opens it would
    recurse into before failing at the end, which count against the limit. Every pass runs at C speed.
    """
    brackets = structure.translate(_SQUARE, _NOT_BRACKETS)
    for _ in range(max_depth):
        if b"[]" not in brackets:
            break
        brackets = brackets.replace(b"[]", b"")
    return b"[]" in brackets or brackets.count(b"[") > max_depth


def has_nul(value: Any) -> bool:
    """Whether a JSON value holds U+0000 anywhere (PostgreSQL's jsonb and text reject it)."""
    return any("\x00" in s for s in _strings(value))


def has_lone_surrogate(value: Any) -> bool:
    """Whether a JSON value holds a string with an unpaired surrogate (``"\\ud800"``: valid JSON, not UTF-8)."""
    for s in _strings(value):
        try:
            s.encode("utf-8")
        except UnicodeEncodeError:
            return True
    return False


def value_problem(value: Any, limits: Limits, what: str) -> str | None:
    """Why a decoded value may not be recorded or replied as it is (None: it may), under the same bounds as a
    message: JSON types only, finite numbers of at most ``max_number_digits`` digits, no NUL, no unpaired
    surrogate, arrays/objects nested at most ``max_depth`` deep. Iterative: no value can exhaust the stack.
    For what an execution sends back (attack-8 F9b): its frames come from workflow code."""
    stack: list[tuple[Any, int]] = [(value, 0)]
    too_large = 10**limits.max_number_digits
    while stack:
        item, depth = stack.pop()
        if not isinstance(item, list | dict):
            problem = _scalar_problem(item, too_large, limits)
            if problem:
                return f"{what} {problem}"
            continue
        if depth >= limits.max_depth:
            return f"{what} nests arrays/objects deeper than {limits.max_depth} levels (MODCACHE_MAX_MESSAGE_DEPTH)"
        if isinstance(item, dict):
            if not all(isinstance(key, str) for key in item):
                return f"{what} has an object key that is not a string"
            stack.extend((key, depth + 1) for key in item)
        stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return None


def _scalar_problem(item: Any, too_large: int, limits: Limits) -> str | None:
    if isinstance(item, str):
        return _string_problem(item)
    if isinstance(item, bool) or item is None:
        return None
    if isinstance(item, int):
        if abs(item) >= too_large:
            return f"holds a number of more than {limits.max_number_digits} digits (MODCACHE_MAX_MESSAGE_NUMBER_DIGITS)"
        return None
    if isinstance(item, float):
        if not math.isfinite(item):
            return f"holds {json.dumps(item)}, which is not JSON and which PostgreSQL cannot store"
        return None
    return f"holds a {type(item).__name__[:40]}, which is not JSON"


def outcome_problem(result: Any, error: Any, *, limits: Limits, max_result_bytes: int) -> str | None:
    """Why an execution's result and error may not be recorded or replied (None: they may): ``value_problem``
    for both, an error that is a string of at most ``MAX_ERROR_CHARS``, a result of at most ``max_result_bytes``
    as JSON. The runtime holds itself to this; a forged result frame may not (attack-8 F9b)."""
    if error is not None:
        if not isinstance(error, str):
            return "its error is not a string"
        if len(error) > MAX_ERROR_CHARS:
            return f"its error is {len(error)} characters, over {MAX_ERROR_CHARS}"
    problem = value_problem(result, limits, "the result") or value_problem(error, limits, "its error")
    if problem:
        return problem
    size = len(json.dumps(result, allow_nan=False))
    if size > max_result_bytes:
        return f"the result is {size} bytes, over the {max_result_bytes}-byte limit (MODCACHE_MAX_RESULT_BYTES)"
    return None


def _string_problem(text: str) -> str | None:
    if "\x00" in text:
        return "holds a NUL character (\\u0000), which PostgreSQL cannot store"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "holds an unpaired surrogate (\\ud800-\\udfff), which is not Unicode"
    return None


def _strings(value: Any) -> Iterator[str]:
    """Every string (keys included) in a JSON value; iterative, so no depth can exhaust the stack."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            yield item
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def _uuid(data: dict[str, Any], field: str) -> uuid.UUID:
    value = data.get(field)
    if value is None:
        raise Malformed(f"{field}: missing")
    if not isinstance(value, str):
        raise Malformed(f"{field}: must be a UUID string, not {type(value).__name__}")
    try:
        return uuid.UUID(value)
    except ValueError:
        raise Malformed(f"{field}: not a UUID") from None
