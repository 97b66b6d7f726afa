"""NOTIFY payloads come from any role with CONNECT: whatever they hold, they are a hint or a resync, never a
crash of the listener callback (a 4,000-deep array raised RecursionError there and the hint was lost)."""

from __future__ import annotations

import pytest

from modcache import pgsource


@pytest.mark.parametrize(
    "payload",
    ["[" * 5000 + "]" * 5000, '{"paths": ' + "[" * 5000 + "]" * 5000 + "}", "not json", "null", '{"paths": 7}', "\x00"],
)
def test_a_payload_that_cannot_be_understood_asks_for_a_resync(payload: str) -> None:
    assert isinstance(pgsource._event(payload), pgsource.ResyncAsked)


def test_a_well_formed_payload_is_a_hint() -> None:
    assert pgsource._event('{"paths": ["a.py", "b/c.py"]}') == pgsource.Hinted(("a.py", "b/c.py"))
