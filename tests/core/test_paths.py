"""The full resync judges 100,000 listed paths at once (``modules.all_paths_good``); it must agree with the one rule
(``modules.path_problem``) on every path an attacker could store, or a bad path would reach a key."""

from __future__ import annotations

import random

from modcache import modules

HOSTILE = ["a", "b", ".", "..", "/", "\\", "\x00", "py", ".py", "\n", "é", " ", "*", "modcache:", "\udcff"]


def test_all_paths_good_agrees_with_path_problem_on_random_hostile_paths() -> None:
    rng = random.Random(9)
    for _ in range(50_000):
        path = "".join(rng.choice(HOSTILE) for _ in range(rng.randrange(8)))
        assert modules.all_paths_good([path]) == (modules.path_problem(path) is None), repr(path)


def test_one_bad_path_among_many_good_ones_is_noticed() -> None:
    good = [f"pkg_{i}/mod_{i}.py" for i in range(1000)] + [".py", "a/..py", ".../x.py"]
    assert modules.all_paths_good(good)
    for bad in ["../x.py", "a/./b.py", "/abs.py", "a//b.py", "x.txt", "a\\b.py", "a\x00.py", "a" * 1001 + ".py", ""]:
        assert not modules.all_paths_good([*good[:500], bad, *good[500:]]), repr(bad)
