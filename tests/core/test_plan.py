"""The pure planner, table-driven: each row is a cache situation and the item it must produce."""

from __future__ import annotations

import pytest

from modcache import modules, plan
from modcache.plan import Operation as Op
from modcache.plan import Reason as R

H1, H2 = "1" * 64, "2" * 64


def view(
    index: frozenset[str] = frozenset(),
    manifest: dict[str, str] | None = None,
    content: dict[str, str | None] | None = None,
) -> plan.CacheView:
    return plan.CacheView(index=frozenset(index), manifest=manifest or {}, content=content or {})


@pytest.mark.parametrize(
    ("situation", "cache", "expected"),
    [
        ("in sync", view({"a.py"}, {"a.py": H1}, {"a.py": H1}), []),
        ("content key expired, index kept", view({"a.py"}, {"a.py": H1}, {"a.py": None}), [(Op.PUT, R.MISSING)]),
        ("never cached", view(), [(Op.PUT, R.MISSING)]),
        ("other content", view({"a.py"}, {"a.py": H2}, {"a.py": H2}), [(Op.PUT, R.STALE)]),
        ("unverifiable content", view({"a.py"}, {"a.py": H1}, {"a.py": plan.UNVERIFIED}), [(Op.PUT, R.STALE)]),
        ("index lost the path", view(set(), {"a.py": H1}, {"a.py": H1}), [(Op.REINDEX, R.INDEX)]),
        ("manifest disagrees", view({"a.py"}, {"a.py": H2}, {"a.py": H1}), [(Op.REINDEX, R.INDEX)]),
    ],
)
def test_live_module(situation: str, cache: plan.CacheView, expected: list[tuple[Op, R]]) -> None:
    result = plan.compute(plan.SourceView({"a.py": H1}), cache)
    assert [(i.operation, i.reason) for i in result.items] == expected, situation


@pytest.mark.parametrize(
    ("situation", "cache", "expected"),
    [
        ("deleted module still cached", view({"a.py"}, {"a.py": H1}, {"a.py": H1}), [(Op.DELETE, R.ORPHAN)]),
        ("unindexed key nobody tracks", view(set(), {}, {"a.py": plan.UNVERIFIED}), [(Op.DELETE, R.ORPHAN)]),
        ("index lists an absent key", view({"a.py"}, {}, {"a.py": None}), [(Op.DELETE, R.INDEX)]),
        ("nothing cached", view(), []),
    ],
)
def test_dead_module(situation: str, cache: plan.CacheView, expected: list[tuple[Op, R]]) -> None:
    result = plan.compute(plan.SourceView({}), cache)
    assert [(i.operation, i.reason) for i in result.items] == expected, situation


def test_rejected_paths_keep_their_cached_version() -> None:
    bad = modules.Rejected("a.py", modules.Rejection.NULL_CONTENT)
    result = plan.compute(plan.SourceView({}, (bad,)), view({"a.py"}, {"a.py": H1}, {"a.py": H1}))
    assert not result.items
    assert result.rejected == (bad,)
    assert result.describe() == "1 rejected"


def test_plan_explains_itself() -> None:
    cache = view({"gone.py", "b.py"}, {"gone.py": H1, "b.py": H1}, {"gone.py": H1, "b.py": H2})
    result = plan.compute(plan.SourceView({"a.py": H1, "b.py": H1}), cache)
    assert [str(i) for i in result.items] == [
        "put     missing a.py",
        "put     stale   b.py",
        "delete  orphan  gone.py",
    ]
    assert result.counts() == {**dict.fromkeys(R, 0), R.MISSING: 1, R.STALE: 1, R.ORPHAN: 1}
    assert result.describe() == "1 missing, 1 stale, 1 orphan"


def test_digest_ignores_order_and_sees_changes() -> None:
    a = plan.source_digest({"a.py": H1, "b.py": H2})
    assert a == plan.source_digest({"b.py": H2, "a.py": H1})
    assert a != plan.source_digest({"a.py": H2, "b.py": H2})


def test_without_orphans_keeps_everything_but_orphan_removals() -> None:
    source = plan.SourceView(live={"a.py": "h1"})
    view = plan.CacheView(
        index=frozenset({"a.py", "gone.py", "ghost.py"}),
        manifest={"gone.py": "h0"},
        content={"a.py": None, "gone.py": "", "ghost.py": None},
    )
    full = plan.compute(source, view)
    kept = plan.without_orphans(full)
    assert {(i.path, i.reason) for i in full.items} - {(i.path, i.reason) for i in kept.items} == {
        ("gone.py", plan.Reason.ORPHAN)
    }
    assert all(i.reason is not plan.Reason.ORPHAN for i in kept.items)
