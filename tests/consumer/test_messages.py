"""The message contract: what parses, and the reason a person reads for what does not (table-driven)."""

from __future__ import annotations

import json
import uuid

import pytest

from modcache_consumer import messages

EXECUTION = str(uuid.uuid4())
WORKFLOW = str(uuid.uuid4())
ORG = str(uuid.uuid4())


def body(**fields: object) -> bytes:
    return json.dumps(fields).encode()


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"{not json", "body is not JSON (Expecting property name enclosed in double quotes at line 1 column 2)"),
        (b"\xff\xfe", "body is not UTF-8"),
        (b"[1, 2]", "body must be a JSON object, not list"),
        (body(workflow_id=WORKFLOW), "execution_id: missing"),
        (body(execution_id="nope", workflow_id=WORKFLOW), "execution_id: not a UUID"),
        (body(execution_id=7, workflow_id=WORKFLOW), "execution_id: must be a UUID string, not int"),
        (body(execution_id=EXECUTION), "workflow_id: missing"),
        (body(execution_id=EXECUTION, workflow_id=WORKFLOW, organization_id="x"), "organization_id: not a UUID"),
        (body(execution_id=EXECUTION, workflow_id=WORKFLOW, parameters=[1]), "parameters: must be an object"),
        (b" " * (messages.MAX_BODY_BYTES + 1), f"body is larger than {messages.MAX_BODY_BYTES} bytes"),
        (
            body(execution_id=EXECUTION, workflow_id=WORKFLOW, parameters={"a": ["ok", {"b": "x\x00y"}]}),
            "parameters: a string holds a NUL character (\\u0000), which PostgreSQL cannot store",
        ),
    ],
)
def test_malformed_messages_say_why(raw: bytes, reason: str) -> None:
    with pytest.raises(messages.Malformed) as caught:
        messages.parse(raw)
    assert caught.value.reason == reason


def test_a_full_request_round_trips() -> None:
    raw = body(execution_id=EXECUTION, workflow_id=WORKFLOW, organization_id=ORG, parameters={"a": [1, {"b": None}]})
    request = messages.parse(raw, reply_to="amq.gen-1", correlation_id="c-1")
    assert request == messages.ExecutionRequest(
        execution_id=messages.ExecutionId(uuid.UUID(EXECUTION)),
        workflow_id=messages.WorkflowId(uuid.UUID(WORKFLOW)),
        organization_id=messages.OrganizationId(uuid.UUID(ORG)),
        parameters={"a": [1, {"b": None}]},
        reply_to="amq.gen-1",
        correlation_id="c-1",
    )
    assert messages.parse(request.encode()).to_raw() == request.to_raw()


@pytest.mark.parametrize("extra", [{}, {"organization_id": None, "parameters": None}, {"unknown_field": 1}])
def test_optional_fields_default_and_unknown_fields_are_ignored(extra: dict[str, object]) -> None:
    request = messages.parse(body(execution_id=EXECUTION, workflow_id=WORKFLOW, **extra))
    assert (request.organization_id, request.parameters, request.reply_to) == (None, {}, None)


def test_statuses_know_which_are_finished() -> None:
    assert [s.value for s in messages.Status if s.finished] == ["SUCCESS", "FAILED", "TIMEOUT"]
