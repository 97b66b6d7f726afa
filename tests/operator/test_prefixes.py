"""The pure PrefixConflict rule: which Redis endpoint a URL names, which prefixes overlap, who is refused."""

from __future__ import annotations

import itertools

import pytest
import redis.connection

from modcache import keys
from modcache_operator import prefixes

P = prefixes.Endpoint


@pytest.mark.parametrize(
    ("url", "endpoint"),
    [
        ("redis://cache:6379/0", P("cache", 6379, 0)),
        ("redis://:s3cr3t@Cache.Example:6380/2", P("cache.example", 6380, 2)),
        ("rediss://user:pw@cache/3", P("cache", 6379, 3)),
        ("redis://cache", P("cache", 6379, 0)),
        ("redis://cache:6379?db=4", P("cache", 6379, 4)),
        ("unix:///run/redis.sock?db=1", P("/run/redis.sock", 0, 1)),
    ],
)
def test_an_endpoint_is_host_port_and_database_without_credentials(url: str, endpoint: prefixes.Endpoint) -> None:
    assert prefixes.endpoint(url) == endpoint
    assert "s3cr3t" not in repr(prefixes.endpoint(url))


@pytest.mark.parametrize(
    ("url", "same_as"),
    [
        ("redis://cache:6379/1?db=0", "redis://cache:6379/0"),  # redis-py lets ?db= win over the path
        ("redis://cache:6379/%31", "redis://cache:6379/1"),  # and percent-decodes the path
        ("redis://%63ache:6379/0", "redis://cache:6379/0"),  # and the host
        ("redis://CACHE/0", "redis://cache:6379/0"),
    ],
)
def test_two_spellings_of_one_database_are_one_endpoint(url: str, same_as: str) -> None:
    """Attack: a second ModuleCache spells the Redis URL differently to escape the PrefixConflict rule, while
    the client connects to the same database; its endpoint must be the one the client really uses."""
    assert prefixes.endpoint(url) == prefixes.endpoint(same_as)
    kwargs = redis.connection.parse_url(url)
    assert prefixes.endpoint(url) == P(kwargs["host"], kwargs.get("port", 6379), kwargs.get("db", 0))


def test_sentinel_and_cluster_endpoints_name_their_nodes_not_their_order() -> None:
    a = prefixes.endpoint("redis+sentinel://s1:26379,s2:26379/main/2")
    assert a == prefixes.endpoint("redis+sentinel://:pw@s2:26379,S1:26379/main/2")
    assert a != prefixes.endpoint("redis+sentinel://s1:26379,s2:26379/other/2")
    cluster = prefixes.endpoint("redis+cluster://n1:7000,n2:7001")
    assert cluster == prefixes.endpoint("redis+cluster://n2:7001,n1:7000")
    assert cluster != a


@pytest.mark.parametrize(
    ("a", "b", "overlap"),
    [
        ("sec:module:", "sec:module:", True),
        ("sec:module:", "sec:module:t2/", True),
        ("sec:module:t2/", "sec:module:", True),
        ("sec:module:a/", "sec:module:b/", False),
        ("mc1:", "mc10:", False),
    ],
)
def test_prefixes_overlap_when_one_starts_the_other(a: str, b: str, overlap: bool) -> None:
    assert keys.prefixes_overlap(a, b) is overlap


def _claim(name: str, created: str, prefix: str, db: int = 0, namespace: str = "ns") -> prefixes.Claim:
    return prefixes.Claim(owner=(namespace, name), created=created, endpoint=P("cache", 6379, db), prefix=prefix)


OLD = _claim("old", "2025-01-01T00:00:00Z", "sec:module:")
YOUNG = _claim("young", "2025-02-01T00:00:00Z", "sec:module:t2/")


def test_the_younger_of_two_overlapping_claims_is_refused_naming_the_older() -> None:
    assert prefixes.blockers([YOUNG, OLD]) == {("ns", "young"): OLD}


def test_the_same_creation_time_falls_back_to_namespace_and_name() -> None:
    a = _claim("a", "2025-01-01T00:00:00Z", "p:")
    b = _claim("b", "2025-01-01T00:00:00Z", "p:")
    assert prefixes.blockers([b, a]) == {("ns", "b"): a}


def test_other_databases_and_disjoint_prefixes_never_conflict() -> None:
    other_db = _claim("other-db", "2025-03-01T00:00:00Z", "sec:module:", db=1)
    disjoint = _claim("disjoint", "2025-03-01T00:00:00Z", "sec:other:")
    assert prefixes.blockers([OLD, other_db, disjoint]) == {}


def test_a_refused_claim_blocks_no_one() -> None:
    """old wins; middle (overlaps old) is refused; tail overlaps only middle, so it runs."""
    old = _claim("old", "2025-01-01T00:00:00Z", "a:x/")
    middle = _claim("middle", "2025-02-01T00:00:00Z", "a:")
    tail = _claim("tail", "2025-03-01T00:00:00Z", "a:y/")
    assert prefixes.blockers([tail, middle, old]) == {("ns", "middle"): old}


def test_the_outcome_does_not_depend_on_the_order_claims_arrive_in() -> None:
    claims = [OLD, YOUNG, _claim("third", "2025-01-15T00:00:00Z", "sec:"), _claim("free", "2025-01-20T00:00:00Z", "z:")]
    outcomes = {tuple(sorted(prefixes.blockers(order).items())) for order in itertools.permutations(claims)}
    assert len(outcomes) == 1
