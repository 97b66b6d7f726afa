"""The wire shapes of the execution queue, and the rules that judge a message. Pure: no I/O, no clock.

A request is JSON ``{"execution_id": uuid, "workflow_id": uuid, "organization_id": uuid | null,
"parameters": {...}}``; callers that wait set the AMQP ``reply_to`` and ``correlation_id`` properties and get a
``RawReply``. ``parse`` returns an ``ExecutionRequest`` or raises ``Malformed`` with a reason a person can act
on (it goes into the poison queue's reason header), never echoing the body.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import uuid
from typing import Any, NewType, TypedDict

from modcache import errors

ExecutionId = NewType("ExecutionId", uuid.UUID)
WorkflowId = NewType("WorkflowId", uuid.UUID)
OrganizationId = NewType("OrganizationId", uuid.UUID)

MAX_BODY_BYTES = 1024 * 1024


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


def parse(
    body: bytes, *, reply_to: str | None = None, correlation_id: str | None = None, max_bytes: int = MAX_BODY_BYTES
) -> ExecutionRequest:
    """The request in ``body``, or Malformed saying what is wrong with it."""
    if len(body) > max_bytes:
        raise Malformed(f"body is larger than {max_bytes} bytes")
    try:
        data = json.loads(body.decode("utf-8"))
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
    org = data.get("organization_id")
    return ExecutionRequest(
        execution_id=ExecutionId(_uuid(data, "execution_id")),
        workflow_id=WorkflowId(_uuid(data, "workflow_id")),
        organization_id=OrganizationId(_uuid(data, "organization_id")) if org is not None else None,
        parameters=parameters,
        reply_to=reply_to or None,
        correlation_id=correlation_id or None,
    )


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


def has_nul(value: Any) -> bool:
    """Whether a JSON value holds U+0000 anywhere (PostgreSQL's jsonb and text reject it)."""
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(has_nul(k) or has_nul(v) for k, v in value.items())
    if isinstance(value, list):
        return any(has_nul(v) for v in value)
    return False


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
