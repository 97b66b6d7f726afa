"""The message contract: what parses, and the reason a person reads for what does not (table-driven)."""

from __future__ import annotations

import json
import random
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
        (b" " * (messages.MAX_BODY_BYTES + 1), "body is larger than 1048576 bytes (MODCACHE_MAX_MESSAGE_BYTES)"),
        (b'{"a": "\x00"}', "body holds a NUL byte at offset 7"),
        (b"[" * 200_000, "body nests arrays/objects deeper than 32 levels (MODCACHE_MAX_MESSAGE_DEPTH)"),
        (b"[" * 33 + b"]" * 33, "body nests arrays/objects deeper than 32 levels (MODCACHE_MAX_MESSAGE_DEPTH)"),
        (
            body(execution_id=EXECUTION, workflow_id=WORKFLOW, parameters={"n": int("7" * 4000)}),
            "a number has more than 100 digits (MODCACHE_MAX_MESSAGE_NUMBER_DIGITS)",
        ),
        (
            b'{"n": -0.' + b"1" * 101 + b"}",
            "a number has more than 100 digits (MODCACHE_MAX_MESSAGE_NUMBER_DIGITS)",
        ),
        (b'{"parameters": {"x": NaN}}', "body holds NaN, which is not JSON and which PostgreSQL cannot store"),
        (b'{"x": [-Infinity]}', "body holds -Infinity, which is not JSON and which PostgreSQL cannot store"),
        (b'{"x": 1e999}', "body holds the number 1e999, too large for a float (it would be infinite)"),
        (b'{"x": -1.5E+400}', "body holds the number -1.5E+400, too large for a float (it would be infinite)"),
        (
            body(execution_id=EXECUTION, workflow_id=WORKFLOW, parameters={"a": "\ud800"}),
            "parameters: a string holds an unpaired surrogate (\\ud800-\\udfff), which is not Unicode",
        ),
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


def nested(levels: int) -> dict[str, object]:
    value: dict[str, object] = {}
    for _ in range(levels - 1):
        value = {"a": value}
    return value


@pytest.mark.parametrize(
    "raw",
    [
        body(execution_id=EXECUTION, workflow_id=WORKFLOW, parameters=nested(31)),  # 32 levels with the body
        body(execution_id=EXECUTION, workflow_id=WORKFLOW, parameters={"s": "[" * 1000 + "7" * 1000 + "\\"}),
        body(execution_id=EXECUTION, workflow_id=WORKFLOW, parameters={"n": int("9" * 100), "f": 1.5e300}),
    ],
    ids=["at the depth limit", "brackets, digits and escapes inside a string", "a number at the digit limit"],
)
def test_what_the_prescan_lets_through_parses(raw: bytes) -> None:
    assert messages.parse(raw).parameters == json.loads(raw)["parameters"]


def test_one_level_deeper_than_the_limit_is_malformed() -> None:
    raw = body(execution_id=EXECUTION, workflow_id=WORKFLOW, parameters=nested(32))
    with pytest.raises(messages.Malformed, match="deeper than 32 levels"):
        messages.parse(raw)


@pytest.mark.parametrize(
    ("limits", "reason"),
    [
        (messages.Limits(max_bytes=10), "body is larger than 10 bytes (MODCACHE_MAX_MESSAGE_BYTES)"),
        (messages.Limits(max_depth=1), "body nests arrays/objects deeper than 1 levels (MODCACHE_MAX_MESSAGE_DEPTH)"),
        (messages.Limits(max_number_digits=2), "a number has more than 2 digits (MODCACHE_MAX_MESSAGE_NUMBER_DIGITS)"),
    ],
)
def test_the_limits_are_the_settings(limits: messages.Limits, reason: str) -> None:
    raw = body(execution_id=EXECUTION, workflow_id=WORKFLOW, parameters={"n": 123})
    with pytest.raises(messages.Malformed) as caught:
        messages.parse(raw, limits=limits)
    assert caught.value.reason == reason


def test_an_unterminated_string_full_of_backslashes_is_scanned_in_linear_time() -> None:
    raw = b'{"a": "' + b"\\" * 500_001  # an odd count: the last escape is cut off
    with pytest.raises(messages.Malformed, match="not JSON"):
        messages.parse(raw)


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


def _parser_depth(brackets: bytes) -> int:
    """How deep a JSON parser recurses into ``brackets`` before it ends or fails (the reference)."""
    depth = deepest = 0
    for c in brackets:
        depth += 1 if c in b"[{" else -1
        if depth < 0:
            break
        deepest = max(deepest, depth)
    return deepest


def test_deeper_than_is_exact_on_balanced_nesting_and_bounded_on_the_rest() -> None:
    """Against a per-byte reference on 3,000 random bracket strings (fixed seed): exact when every bracket is
    closed; never lets the parser recurse past twice the limit otherwise."""
    rng = random.Random(8)
    for _ in range(3000):
        opened, text = 0, bytearray()
        for _ in range(rng.randint(0, 120)):
            if opened and rng.random() < 0.5:
                text += rng.choice([b"]", b"}"])
                opened -= 1
            else:
                text += rng.choice([b"[", b"{"])
                opened += 1
        closed = rng.random() < 0.6
        if closed:
            text += b"]" * opened
        for limit in (1, 3, 10, 32):
            found = messages.deeper_than(bytes(text), limit)
            if closed:
                assert found is (_parser_depth(bytes(text)) > limit), (bytes(text), limit)
            else:
                assert found or _parser_depth(bytes(text)) <= 2 * limit, (bytes(text), limit)


def _nested(levels: int) -> object:
    value: object = "leaf"
    for n in range(levels):
        value = [value] if n % 2 else {"k": value}
    return value


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ({"ok": [1, 2.5, True, None, "text", 10**99]}, None),
        (_nested(messages.MAX_DEPTH), None),
        (_nested(messages.MAX_DEPTH + 1), "the result nests arrays/objects deeper than 32 levels"),
        (-(10**100), "the result holds a number of more than 100 digits"),
        ([float("nan")], "the result holds NaN"),
        ({"k": "a\x00"}, "the result holds a NUL character"),
        ({"\ud800": 1}, "the result holds an unpaired surrogate"),
        ({1: "int key"}, "the result has an object key that is not a string"),
        ((1, 2), "the result holds a tuple, which is not JSON"),
    ],
)
def test_a_value_to_record_is_held_to_the_bounds_of_a_message(value: object, problem: str | None) -> None:
    found = messages.value_problem(value, messages.Limits(), "the result")
    assert found == problem if problem is None else (found or "").startswith(problem)


def test_an_outcome_bounds_its_error_and_its_size() -> None:
    def check(result: object, error: object) -> str | None:
        return messages.outcome_problem(result, error, limits=messages.Limits(), max_result_bytes=100)

    assert check("x" * 90, "e" * messages.MAX_ERROR_CHARS) is None
    assert check(None, "e" * (messages.MAX_ERROR_CHARS + 1)) == "its error is 4001 characters, over 4000"
    assert check(None, 7) == "its error is not a string"
    assert check("x" * 100, None) == "the result is 102 bytes, over the 100-byte limit (MODCACHE_MAX_RESULT_BYTES)"
