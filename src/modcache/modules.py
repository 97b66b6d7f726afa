"""The vocabulary of a module: its path rules, its hash, and its cached JSON shape.

Pure functions only; used by the engine, the CLI writers, the consumer's import hook and the tests, so that a
path is judged the same way everywhere.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import json.encoder
import re
from collections.abc import Sequence
from typing import NewType, TypedDict

from modcache import errors

ModulePath = NewType("ModulePath", str)
ContentHash = NewType("ContentHash", str)

MAX_PATH_CHARS = 1000
DEFAULT_MAX_MODULE_BYTES = 8 * 1024 * 1024


class RawCachedModule(TypedDict):
    """The JSON value of a content key, as Bifrost workers read it. ``hash`` must stay last."""

    content: str
    path: str
    hash: str


class Rejection(enum.StrEnum):
    """Why a source row cannot be served. The value is the reason shown to people."""

    BAD_PATH = "invalid path"
    NULL_CONTENT = "content is NULL"
    HASH_MISMATCH = "stored content_hash disagrees with the content"
    #: found by a deep resync: the listing (which reads no content) showed the row unchanged, so the cache keeps
    #: serving the version its content_hash names while the content says otherwise (an UPDATE that forgot the hash)
    CONTENT_CHANGED = "content changed but content_hash did not"
    NOT_UTF8 = "content is not valid UTF-8"
    TOO_LARGE = "content exceeds the size limit"


@dataclasses.dataclass(frozen=True)
class Rejected:
    """A source row that was skipped, and why. The cache keeps whatever it had for this path."""

    path: str
    reason: Rejection
    detail: str = ""

    def __str__(self) -> str:
        detail = f" ({self.detail})" if self.detail else ""
        return f"{self.path!r}: {self.reason.value}{detail}"


#: The acceptable paths in one expression (the common case, checked at C speed); ``path_problem`` explains the rest.
_GOOD_PATH = re.compile(r"(?:(?!\.{1,2}/)[^/\\\x00\ud800-\udfff]+/)*[^/\\\x00\ud800-\udfff]*\.py")
#: Lone surrogates: what bytes that are not UTF-8 become when Redis replies are decoded with ``surrogateescape``.
_NOT_UTF8 = re.compile(r"[\ud800-\udfff]")
_escape = json.encoder.encode_basestring_ascii  # what json.dumps uses for a str with its defaults


def path_problem(path: str) -> str | None:
    """Why ``path`` is not an acceptable module path, or None if it is.

    Rules: relative, ``/``-separated, ending in ``.py``, no empty/``.``/``..`` segments, no NUL, no
    backslash, valid UTF-8 (a name read back from Redis that was not arrives with lone surrogates), at most 1000
    characters.
    """
    if len(path) <= MAX_PATH_CHARS and _GOOD_PATH.fullmatch(path) is not None:
        return None
    if not path:
        return "empty"
    if len(path) > MAX_PATH_CHARS:
        return f"longer than {MAX_PATH_CHARS} characters"
    if "\x00" in path:
        return "contains NUL"
    if _NOT_UTF8.search(path):
        return "not valid UTF-8"
    if path.startswith("/"):
        return "absolute (leading '/')"
    if "\\" in path:
        return "contains '\\' (use '/' separators)"
    if not path.endswith(".py"):
        return "does not end in '.py'"
    if "//" in path or "/./" in f"/{path}" or "/../" in f"/{path}":
        return "has an empty, '.' or '..' segment"
    return None


def all_paths_good(paths: Sequence[str]) -> bool:
    """Whether every path passes ``path_problem`` (True), judged at C speed over all of them at once; False means
    at least one may not (ask ``path_problem`` of each). Used on the 100,000-path listings of a full resync.

    The rules, on the paths joined with NUL (which no good path contains): exactly ``len - 1`` NULs, no backslash,
    no ``//``, no ``.``/``..`` directory segment (``/./``, ``/../``, or at a path's start), no leading ``/``, each
    path ends in ``.py`` (``.py`` + NUL occurs once per path), none longer than ``MAX_PATH_CHARS``."""
    if not paths:
        return True
    joined = "\0" + "\0".join(paths) + "\0"
    return (
        joined.count("\0") == len(paths) + 1
        and joined.count(".py\0") == len(paths)
        and max(map(len, paths)) <= MAX_PATH_CHARS
        and not any(bad in joined for bad in _BAD_PARTS)
        and _NOT_UTF8.search(joined) is None
    )


_BAD_PARTS = ("\\", "//", "\0/", "/./", "/../", "\0./", "\0../")


def check_path(path: str) -> ModulePath:
    """``path`` as a ModulePath, or InputError naming it."""
    problem = path_problem(path)
    if problem is not None:
        raise errors.InputError(path, f"invalid module path: {problem}")
    return ModulePath(path)


def content_hash(content: bytes) -> ContentHash:
    return ContentHash(hashlib.sha256(content).hexdigest())


def decode_content(path: str, raw: bytes, *, max_bytes: int) -> str | Rejected:
    """Content bytes as text, or the Rejected that says why they cannot be served."""
    if len(raw) > max_bytes:
        return Rejected(path, Rejection.TOO_LARGE, f"{len(raw)} > {max_bytes} bytes")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return Rejected(path, Rejection.NOT_UTF8, f"byte {e.start}")


def encode_cached(path: str, content: str, digest: str) -> str:
    """The content key's value, exactly as Bifrost wrote it: ``json.dumps`` of a ``RawCachedModule`` with its
    defaults (hash last), assembled from the same escaper without building the dict."""
    return f'{{"content": {_escape(content)}, "path": {_escape(path)}, "hash": {_escape(digest)}}}'


def cached_tail(path: str, digest: str) -> str:
    """How every value ``encode_cached`` makes for ``path`` at ``digest`` ends (what a content key claims to be)."""
    return f', "path": {_escape(path)}, "hash": {_escape(digest)}}}'


def decode_cached(value: str | bytes) -> RawCachedModule:
    """Parse a content key's value; raises ValueError if it is not the compatible shape."""
    data = json.loads(value)
    if not isinstance(data, dict) or not all(isinstance(data.get(k), str) for k in ("content", "path", "hash")):
        raise ValueError("not a {content, path, hash} object")
    return RawCachedModule(content=data["content"], path=data["path"], hash=data["hash"])
