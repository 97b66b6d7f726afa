"""modcache's error tree, split by what the caller does next.

    ModcacheError
    ├── ConfigError          -- a setting or URL is wrong: fix it, retrying will not help
    ├── InputError           -- one module or message is bad: report it, carry on with the rest
    └── TransientError       -- a service failed: retry later with backoff
        ├── SourceUnavailable    (PostgreSQL)
        └── CacheUnavailable     (Redis)

Adapters translate their library's errors into these at the boundary, with ``from e``. Messages never
carry secrets: URLs are redacted with ``redact_url`` and payloads are truncated with ``truncate``.
"""

from __future__ import annotations

import urllib.parse

MAX_DETAIL_CHARS = 256


class ModcacheError(Exception):
    """Base of every error modcache raises on purpose."""


class ConfigError(ModcacheError):
    """A setting is missing or malformed. ``setting`` names it; the message never holds its value."""

    def __init__(self, setting: str, reason: str) -> None:
        super().__init__(f"{setting}: {reason}")
        self.setting = setting
        self.reason = reason


class InputError(ModcacheError):
    """One input (a module path, its content, a message) is invalid. ``subject`` names it."""

    def __init__(self, subject: str, reason: str) -> None:
        super().__init__(f"{truncate(subject)!r}: {reason}")  # repr: control characters stay visible
        self.subject = subject
        self.reason = reason


class TransientError(ModcacheError):
    """A service is unreachable or failed mid-operation; the same call may succeed later."""


class SourceUnavailable(TransientError):
    """PostgreSQL (the source of truth) could not be used."""


class CacheUnavailable(TransientError):
    """Redis (the module cache) could not be used."""


def truncate(text: str, limit: int = MAX_DETAIL_CHARS) -> str:
    """Cap a detail string before it reaches a log, an event or a status field."""
    return text if len(text) <= limit else f"{text[: limit - 1]}…"


SECRET_PARAMETER_WORDS = ("password", "secret", "token")  # libpq's password/sslpassword, redis-py's password=


def redact_url(url: str) -> str:
    """The URL with any password replaced by ``***``: the one in the credentials and the value of every query
    parameter whose name holds ``password``, ``secret`` or ``token`` (libpq and asyncpg read ``?password=`` and
    ``?sslpassword=``, redis-py ``?password=``: attack-11b T6).

    The credentials are everything between ``://`` and the *last* ``@`` (libpq's and asyncpg's rule): a password
    holding an unencoded ``/``, ``?``, ``#`` or ``@`` would end a ``urlsplit`` authority early and pass through
    whole. Text after a later ``@`` (in a path or query) is hidden too: over-redacting is the safe side."""
    scheme, sep, rest = url.partition("://")
    userinfo, at, tail = rest.rpartition("@")
    if not sep or not at or ":" not in userinfo:
        return _redact_query(url)
    return _redact_query(f"{scheme}://{userinfo.split(':', 1)[0]}:***@{tail}")


def _redact_query(url: str) -> str:
    base, mark, query = url.partition("?")
    if not mark:
        return url
    items = []
    for item in query.split("&"):
        name, equals, _ = item.partition("=")
        named = urllib.parse.unquote_plus(name).lower()
        secret = equals and any(word in named for word in SECRET_PARAMETER_WORDS)
        items.append(f"{name}=***" if secret else item)
    return f"{base}?{'&'.join(items)}"


def url_password(url: str) -> str | None:
    """The password in a URL as it is written (see ``redact_url`` for where it ends), or None."""
    _, sep, rest = url.partition("://")
    userinfo, at, _ = rest.rpartition("@")
    if not sep or not at or ":" not in userinfo:
        return None
    return userinfo.split(":", 1)[1] or None


def describe(exc: BaseException) -> str:
    """A one-line, secret-free, truncated description of an exception for status and events."""
    text = str(exc).splitlines()[0] if str(exc) else ""
    return truncate(f"{type(exc).__name__}: {text}" if text else type(exc).__name__)
