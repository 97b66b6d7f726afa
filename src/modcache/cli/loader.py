"""``modules load-dir``: a directory of ``*.py`` files written to the source of truth at their relative paths.

Each file goes through ``PgSource.put_module`` (the same validation a sync applies); a bad file (bad path, not
UTF-8, too large, unreadable) is reported with its path and reason and never stops the others. A service failure
does stop the load: it is not the file's fault.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Iterator
from pathlib import Path

from modcache import errors, pgsource, settings
from modcache.cli import runtime

SKIPPED_DIRS = frozenset({"__pycache__"})


@dataclasses.dataclass
class LoadResult:
    changed: list[str] = dataclasses.field(default_factory=list)
    unchanged: int = 0
    rejected: list[tuple[str, str]] = dataclasses.field(default_factory=list)


def workspace_files(directory: Path) -> Iterator[tuple[str, Path]]:
    """``(workspace-relative path, file)`` for every ``*.py`` file, sorted; hidden dirs and caches skipped."""
    for file in sorted(directory.rglob("*.py")):
        relative = file.relative_to(directory)
        if any(part.startswith(".") or part in SKIPPED_DIRS for part in relative.parts[:-1]):
            continue
        if file.is_file():
            yield relative.as_posix(), file


async def load_into(source: pgsource.PgSource, directory: Path) -> LoadResult:
    result = LoadResult()
    for path, file in workspace_files(directory):
        problem = await _load_one(source, path, file, result)
        if problem is not None:
            result.rejected.append((path, problem))
    return result


async def _load_one(source: pgsource.PgSource, path: str, file: Path, result: LoadResult) -> str | None:
    """Write one file; the reason it was rejected, or None."""
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return "file name is not valid UTF-8"
    try:
        raw = await asyncio.to_thread(file.read_bytes)
    except OSError as e:
        return f"unreadable: {errors.describe(e)}"
    try:
        changed = await source.put_module(path, raw)
    except errors.InputError as e:
        return e.reason
    if changed:
        result.changed.append(path)
    else:
        result.unchanged += 1
    return None


async def load_dir(config: settings.Settings, directory: Path) -> LoadResult:
    async with runtime.source_only(config) as source:
        return await load_into(source, directory)
