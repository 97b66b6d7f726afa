"""Where the services are: Redis and PostgreSQL URLs parsed into typed endpoints (pure: no I/O, no clients).

Redis URL forms (``docs/topologies.md``)::

    redis://[user:pass@]host:6379[/DB]            one node (rediss:// over TLS; unix:///path.sock?db=N)
    redis+sentinel://[user:pass@]h1:26379[,h2:26379...]/SERVICE[/DB]     the master Sentinel names SERVICE
    redis+cluster://[user:pass@]h1:6379[,h2:6379...]                      a Redis Cluster (database 0 only)

``rediss+sentinel://`` and ``rediss+cluster://`` speak TLS to every node (and to the sentinels). Credentials in
the URL are those of the data nodes. PostgreSQL URLs are libpq's, multi-host included
(``postgresql://u@h1:5432,h2:5432/db?target_session_attrs=read-write``); only their shape is checked here.

Parsing raises ``ValueError`` with a message that never holds the URL (it may carry a password); ``settings``
turns it into a ``ConfigError`` naming the variable. ``wiring`` builds the clients from what is returned.
"""

from __future__ import annotations

import dataclasses
import enum
import ssl
import urllib.parse

REDIS_SCHEMES = ("redis", "rediss", "unix", "redis+sentinel", "rediss+sentinel", "redis+cluster", "rediss+cluster")
POSTGRES_SCHEMES = ("postgresql", "postgres", "postgresql+asyncpg")
DEFAULT_REDIS_PORT = 6379
DEFAULT_SENTINEL_PORT = 26379
DEFAULT_POSTGRES_PORT = 5432
IPV6_EXAMPLE = "::1"


class Topology(enum.StrEnum):
    SINGLE = "single"
    SENTINEL = "sentinel"
    CLUSTER = "cluster"


@dataclasses.dataclass(frozen=True)
class RedisEndpoint:
    """A parsed Redis URL. ``url`` is the original (for a single node, handed to redis-py as is)."""

    topology: Topology
    tls: bool
    hosts: tuple[tuple[str, int], ...]
    url: str = dataclasses.field(repr=False)
    username: str | None = None
    password: str | None = dataclasses.field(default=None, repr=False)
    service: str | None = None  # Sentinel: the monitored master's name
    db: int = 0
    socket: str | None = None  # unix:// : the socket's path

    def describe(self) -> str:
        """What the URL names, without credentials (for logs and status)."""
        nodes = ",".join(f"{h}:{p}" for h, p in self.hosts)
        tls = " over TLS" if self.tls else ""
        if self.topology is Topology.SENTINEL:
            return f"the master of {self.service!r} (db {self.db}) via sentinels {nodes}{tls}"
        if self.topology is Topology.CLUSTER:
            return f"the Redis Cluster seeded by {nodes}{tls}"
        return f"{nodes or 'a unix socket'} (db {self.db}){tls}"


URL_DELIMITERS = "/?#@"  # what ends the user, the password or the host part of a URL, unless percent-encoded


def check_credentials(rest: str) -> None:
    """``ValueError`` if the user or password of a URL (``rest``: after ``://``) holds an unencoded ``/``, ``?``,
    ``#`` or ``@``. The drivers end the credentials at different places then (``urlsplit``, redis-py and asyncpg at
    the first ``/``, ``?`` or ``#``; asyncpg at the first ``@``, ``redact_url`` at the last), so the one that is
    handed the URL takes part of the password for a host or a port, and says so in its error (attack-11b T4, T5).
    The message never holds the URL."""
    userinfo, at, _ = rest.rpartition("@")
    if at and any(c in userinfo for c in URL_DELIMITERS):
        raise ValueError(
            "the user or password holds an unencoded '/', '?', '#' or '@' (or an '@' follows the host): "
            "percent-encode them in the URL (%2F, %3F, %23, %40)"
        )


def parse_redis(url: str) -> RedisEndpoint:
    """The endpoint a Redis URL names (``ValueError`` if it is not one of the forms above)."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in REDIS_SCHEMES:
        raise ValueError(f"URL scheme must be one of {', '.join(REDIS_SCHEMES)}")
    check_credentials(rest)
    base, _, kind = scheme.partition("+")
    tls = base == "rediss"
    if not kind:
        return _single(url, tls=tls)
    rest, _, query = rest.partition("#")[0].partition("?")
    if query:  # redis-py never sees these URLs: a parameter here would be ignored, silently
        names = ", ".join(sorted({n for n, _ in urllib.parse.parse_qsl(query, keep_blank_values=True)})) or "?"
        where = "the database goes in the path (/SERVICE/DB)" if kind == "sentinel" else "the database is 0"
        raise ValueError(
            f"a {scheme}:// URL takes no query parameters (it has {names}): {where}, and TLS is set by "
            "the MODCACHE_REDIS_SSL_* settings"
        )
    netloc, _, path = rest.partition("/")
    username, password, hosts = split_netloc(
        netloc, default_port=DEFAULT_SENTINEL_PORT if kind == "sentinel" else DEFAULT_REDIS_PORT
    )
    if not hosts:
        raise ValueError("names no host")
    for n, (host, port) in enumerate(hosts):  # a sentinel listed twice would vote twice (attack-11b T9)
        if (host.lower(), port) in {(h.lower(), p) for h, p in hosts[:n]}:
            raise ValueError(f"lists {host}:{port} twice: list each {kind} node once")
    if kind == "cluster":
        if path.strip("/") not in ("", "0"):
            raise ValueError("a Redis Cluster has only database 0: drop the /DB part")
        return RedisEndpoint(Topology.CLUSTER, tls, hosts, url, username, password)
    service, _, db = path.partition("/")
    service = urllib.parse.unquote(service)
    if not service:
        raise ValueError("names no Sentinel service: redis+sentinel://host:26379[,host:26379]/SERVICE[/DB]")
    return RedisEndpoint(Topology.SENTINEL, tls, hosts, url, username, password, service, _db(db.strip("/")))


def _single(url: str, *, tls: bool) -> RedisEndpoint:
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:  # urllib's only complaint here: "Invalid IPv6 URL"
        raise ValueError(f"an IPv6 address has no closing bracket: write it [{IPV6_EXAMPLE}]:6379") from None
    hostlist = parts.netloc.rpartition("@")[2]
    if "," in hostlist:
        raise ValueError("several hosts need redis+sentinel:// or redis+cluster://")
    if parts.hostname:
        _host_port(hostlist, DEFAULT_REDIS_PORT)  # the port's own checks (urllib takes '²' and '٦٣٧٩' for digits)
    url_query(url)  # every parameter once, with a value (the TLS checks read it as redis-py does)
    try:
        port = parts.port
    except ValueError:  # urllib's message quotes the port's text: with no host before it, it is the password
        raise ValueError("the port must be a number from 1 to 65535, in ASCII digits") from None
    # Where the client connects is what redis-py's ``parse_url`` makes of the URL (it goes to redis-py as is):
    # ``?db=`` wins over the path, host and path are percent-decoded. Reading it any other way would watch the
    # key events of another database and let two overlapping prefixes pass as different endpoints.
    query = urllib.parse.parse_qs(parts.query)
    db_text = urllib.parse.unquote(query["db"][0]) if query.get("db") else ""
    if not db_text and parts.scheme != "unix":
        db_text = urllib.parse.unquote(parts.path).replace("/", "")
    host = urllib.parse.unquote(parts.hostname).lower() if parts.hostname else None
    return RedisEndpoint(
        Topology.SINGLE,
        tls,
        ((host, port or DEFAULT_REDIS_PORT),) if host else (),
        url,
        urllib.parse.unquote(parts.username) if parts.username else None,
        urllib.parse.unquote(parts.password) if parts.password else None,
        db=_db(db_text),
        socket=urllib.parse.unquote(parts.path) if parts.scheme == "unix" and parts.path else None,
    )


def _db(text: str) -> int:
    if not text:
        return 0
    if not is_number(text):
        raise ValueError(f"the database must be a number of ASCII digits (0, 1, ...), not {text!r}")
    return int(text)


def is_number(text: str) -> bool:
    """ASCII digits only: ``str.isdigit`` also takes '²' and Arabic-Indic digits, which ``int`` reads (or not)."""
    return text.isascii() and text.isdigit()


def split_netloc(netloc: str, *, default_port: int) -> tuple[str | None, str | None, tuple[tuple[str, int], ...]]:
    """``[user[:pass]@]h1[:p1][,h2[:p2]...]`` as (user, password, ((host, port), ...)); IPv6 hosts in brackets."""
    credentials, at, hostlist = netloc.rpartition("@")
    username = password = None
    if at:
        user, colon, secret = credentials.partition(":")
        username = urllib.parse.unquote(user) or None
        password = urllib.parse.unquote(secret) if colon else None
    hosts = []
    for item in hostlist.split(","):
        if not item:
            continue
        hosts.append(_host_port(item, default_port))
    return username, password, tuple(hosts)


def _host_port(item: str, default_port: int) -> tuple[str, int]:
    if item.startswith("["):
        host, closed, tail = item[1:].partition("]")
        if not closed:
            raise ValueError(f"an IPv6 address has no closing bracket: write it [{IPV6_EXAMPLE}]:{default_port}")
        if tail and not tail.startswith(":"):
            raise ValueError(f"after the IPv6 address [{host}] comes ':PORT' or nothing")
        port_text = tail.removeprefix(":")
    else:
        host, _, port_text = item.partition(":")
    if not host:
        raise ValueError("a host is empty")
    if not port_text:
        return host, default_port
    if not is_number(port_text) or not 0 < int(port_text) < 65536:
        # the port's text is not echoed: in a URL missing its '@' (user:secret/db) it is the password
        raise ValueError(f"the port of {host!r} must be a number from 1 to 65535, in ASCII digits")
    return host, int(port_text)


def check_postgres(url: str) -> tuple[tuple[str, int], ...]:
    """The hosts of a PostgreSQL URL, one or several (``ValueError`` if it is not a PostgreSQL URL)."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in POSTGRES_SCHEMES:
        raise ValueError(f"URL scheme must be one of {', '.join(POSTGRES_SCHEMES)}")
    check_credentials(rest)
    netloc = rest.split("/", 1)[0].split("?", 1)[0].split("#", 1)[0]
    hosts = split_netloc(netloc, default_port=DEFAULT_POSTGRES_PORT)[2]
    query = url_query(url)  # every parameter once, with a value: a blank ?sslmode= was dropped by asyncpg (T2)
    if not hosts and "host" in query:  # libpq's other form, which asyncpg reads when the netloc names no host
        return _query_hosts(query["host"], query.get("port", ""))
    return hosts


def _query_hosts(names: str, ports: str) -> tuple[tuple[str, int], ...]:
    """``?host=h1,h2&port=p1,p2`` as asyncpg reads it: one port for all, or one per host (attack-11c U7: only the
    netloc's hosts were tried again after a refusal)."""
    hosts = [h for h in names.split(",") if h]
    try:
        numbers = [int(p) for p in ports.split(",") if p] or [DEFAULT_POSTGRES_PORT]
    except ValueError:
        raise ValueError("?port= must be port numbers, separated by commas") from None
    if len(numbers) == 1:
        numbers *= len(hosts)
    if len(numbers) != len(hosts):
        raise ValueError(f"?host= names {len(hosts)} hosts but ?port= {len(numbers)} ports: give one, or one each")
    return tuple(zip(hosts, numbers, strict=True))


SSL_MODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")  # libpq's, weakest first
PLAINTEXT_SSL_MODES = ("disable", "allow", "prefer")  # may talk to the server unencrypted, or unverified


def sslmode(value: str) -> str:
    """``value`` the way asyncpg reads an ``sslmode`` (``SSLMode.parse``: ``-`` and ``_`` are one, so ``verify_ca``
    is ``verify-ca``), in libpq's spelling; ``ValueError`` for anything asyncpg would not take as one of
    ``SSL_MODES``. A check that compared the raw text let ``verify_ca`` past a verify-full setting (attack-11c U4)."""
    normal = value.replace("_", "-")
    if normal not in SSL_MODES:
        raise ValueError(f"sslmode={value!r} is not one of {', '.join(SSL_MODES)}")
    return normal


REDIS_FALSE = ("0", "F", "FALSE", "N", "NO")  # what redis-py's URL parser reads as false


def url_query(url: str) -> dict[str, str]:
    """The query parameters of ``url``, each given once and with a value (``ValueError`` naming the first that is
    not). The drivers disagree about the others: redis-py takes the first of a repeated parameter and asyncpg the
    last, both drop a blank one (and asyncpg then falls back to ``PGSSLMODE`` or ``prefer``), so a check reading
    ``?ssl_cert_reqs=none&ssl_cert_reqs=required`` or ``?sslmode=`` one way was passed by a URL the driver read
    the other way (attack-11b T1, T2). Refusing them leaves one reading, the driver's."""
    found: dict[str, str] = {}
    for name, value in urllib.parse.parse_qsl(url.partition("?")[2].partition("#")[0], keep_blank_values=True):
        if name in found:
            raise ValueError(f"the query parameter {name!r} is given twice: give it once")
        if not value:
            raise ValueError(f"the query parameter {name!r} has no value: give it one, or drop it")
        found[name] = value
    return found


def redis_tls_relaxations(url: str) -> list[tuple[str, str]]:
    """``(parameter, what it does)`` for each query parameter of a ``rediss://`` URL that weakens the server
    certificate check (redis-py reads them and lets them override the client's options)."""
    query = url_query(url)
    found = []
    reqs = query.get("ssl_cert_reqs", "").lower().removeprefix("cert_")
    if reqs in ("none", "optional"):
        found.append((f"ssl_cert_reqs={reqs}", "the server's certificate is not verified"))
    if query.get("ssl_check_hostname", "").upper() in REDIS_FALSE and "ssl_check_hostname" in query:
        found.append(("ssl_check_hostname=false", "the server's certificate need not name the host"))
    if "ssl_exclude_verify_flags" in query:
        found.append(("ssl_exclude_verify_flags", "certificate checks are turned off"))
    for name in ("ssl_ca_certs", "ssl_ca_path", "ssl_ca_data"):
        if name in query:
            found.append((name, "another CA is trusted"))
    return found + _weak_protocol(query)


def _weak_protocol(query: dict[str, str]) -> list[tuple[str, str]]:
    """``ssl_min_version`` below TLS 1.2 and an ``ssl_ciphers`` list that admits unauthenticated, unencrypted or
    weak suites, or lowers OpenSSL's security level (attack-11c U8: TLS 1.0 and NULL/anon suites were taken
    silently beside the TLS settings)."""
    found = []
    version = query.get("ssl_min_version")
    if version is not None and (not version.isdigit() or int(version) < ssl.TLSVersion.TLSv1_2):
        found.append((f"ssl_min_version={version}", "TLS versions older than 1.2 are allowed"))
    ciphers = query.get("ssl_ciphers")
    if ciphers is not None and _weak_ciphers(ciphers):
        found.append((f"ssl_ciphers={ciphers}", "weak, unauthenticated or unencrypted cipher suites are allowed"))
    return found


def _weak_ciphers(ciphers: str) -> bool:
    if "SECLEVEL" in ciphers.upper():
        return True
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        context.set_ciphers(ciphers)
    except ssl.SSLError:
        return False  # no cipher at all: redis-py fails to connect, nothing is weakened
    return any(
        c.get("auth") == "auth-null" or c.get("symmetric") in (None, "null") or int(c.get("strength_bits", 0)) < 128
        for c in context.get_ciphers()
    )


def with_query(url: str, extra: dict[str, str]) -> str:
    """``url`` with the ``extra`` query parameters the URL does not set itself (the URL's own win). A parameter
    the URL repeats or leaves blank is a ``ValueError`` (``url_query``): a blank ``sslmode=`` counted as set, kept
    the setting's ``verify-full`` out, and asyncpg, dropping it, fell back to ``prefer`` (attack-11b T2)."""
    base, _, query = url.partition("?")
    present = url_query(url)
    added = {k: v for k, v in extra.items() if k not in present}
    if not added:
        return url
    joined = "&".join(filter(None, [query, urllib.parse.urlencode(added)]))
    return f"{base}?{joined}"
