"""The execution's import hook: workspace modules from the module cache, in Bifrost's layout.

``import a.b`` maps to ``a/b.py``, then ``a/b/__init__.py`` (a package); if neither exists but an indexed path
starts with ``a/b/``, ``a.b`` is a namespace package. The finder sits *after* the standard finders, so a
workspace file can never shadow the standard library or an installed package.

The hook holds no Redis client: each lookup goes to a ``Store`` (``runtime.ChannelStore``: the consumer reads
the cache in one MULTI/EXEC round trip, verifies each content's SHA-256, and answers over the execution's
channel; lookups the template already knew at the pinned generation are answered from inherited memory, with
their compiled code). What a lookup can find:

* content: the module is compiled with its workspace path as filename (tracebacks and SyntaxErrors name it);
* no content, but the path is indexed or in the manifest (expired, evicted): the consumer is asked to repair it
  from PostgreSQL (``request_repair``, single-flight there) and the lookup is repeated;
* nothing: the consumer is asked once per name and generation, for a module the cache has not seen yet.

Every execution is a fresh process, so ``sys.modules`` starts without workspace modules; ``begin`` and the
eviction below keep a long-lived interpreter correct too (bifrost-contract.md, defect 7) and cost nothing here.

One execution sees one generation: a module first imported during an execution whose manifest entry is newer
than the pinned generation is accepted only if none of the loaded modules changed meanwhile (else ImportError:
the workspace changed during this execution).
"""

from __future__ import annotations

import builtins
import dataclasses
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

from modcache import modules

RepairRequest = Callable[[list[str]], None]
"""Asks the consumer to repair ``paths`` from the source; raises ImportError if it could not."""


@dataclasses.dataclass(frozen=True)
class Entry:
    """One candidate path as the cache holds it."""

    path: str
    content: str | None
    hash: str | None
    manifest_generation: int | None
    manifest_hash: str | None
    indexed: bool

    @property
    def known(self) -> bool:
        return self.indexed or self.manifest_hash is not None


@dataclasses.dataclass(frozen=True)
class Loaded:
    """A workspace module in ``sys.modules``: the path it came from and its hash (None: namespace package,
    whose ``__init__.py`` is expected to stay absent)."""

    path: str
    hash: str | None


class Store(Protocol):
    """Where the hook reads the cache: ``runtime.ChannelStore`` (the consumer, over the execution's channel)."""

    def lookup(self, paths: Sequence[str]) -> tuple[int | None, list[Entry]]: ...

    def manifest(self, paths: Sequence[str]) -> tuple[int | None, dict[str, str]]: ...

    def is_directory(self, rel: str, generation: int | None) -> bool: ...

    def compiled(self, entry: Entry) -> types.CodeType: ...


class WorkspaceImporter(importlib.abc.MetaPathFinder):
    def __init__(self, *, store: Store, request_repair: RepairRequest) -> None:
        self._store = store
        self._request_repair = request_repair
        self._loaded: dict[str, Loaded] = {}
        self._importers: dict[str, set[str]] = {}
        self._checked: int | None = None  # the generation sys.modules is known to agree with
        self._asked: set[tuple[str, int | None]] = set()

    # -- between executions ---------------------------------------------------------------------------------

    def begin(self, generation: int) -> list[str]:
        """Make the loaded workspace modules agree with the cache at ``generation`` (or later); returns the
        names evicted. No Redis round trip when the generation did not move."""
        if self._checked is not None and generation <= self._checked:
            return []
        if not self._loaded:
            self._checked = generation
            return []
        current, hashes = self._store.manifest([m.path for m in self._loaded.values()])
        evicted = self._evict(self._changed(hashes))
        self._checked = max(generation, current or 0)
        return evicted

    @property
    def loaded(self) -> dict[str, Loaded]:
        return dict(self._loaded)

    # -- the finder -----------------------------------------------------------------------------------------

    def find_spec(
        self, fullname: str, path: Sequence[str] | None = None, target: types.ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        parent = fullname.rpartition(".")[0]
        if parent and parent not in self._loaded:
            return None  # a submodule of an installed package: not ours
        rel = fullname.replace(".", "/")
        candidates = [f"{rel}.py", f"{rel}/__init__.py"]
        if any(modules.path_problem(c) for c in candidates):
            return None
        generation, entries = self._lookup(candidates)
        entry = _with_content(entries)
        known = [e.path for e in entries if e.known]
        if entry is None and known:
            self._request_repair(known)  # expired or evicted: repaired from the source, then read again
            generation, entries = self._lookup(candidates)
            entry = _with_content(entries)
        unseen = not known and not self._store.is_directory(rel, generation)
        if entry is None and unseen and (fullname, generation) not in self._asked:
            self._asked.add((fullname, generation))
            self._request_repair(candidates)  # the cache may not have seen a new module or directory yet
            generation, entries = self._lookup(candidates)
            entry = _with_content(entries)
        if entry is None:
            return self._namespace_spec(fullname, rel) if self._store.is_directory(rel, generation) else None
        self._keep_one_generation(entry)
        return self._source_spec(fullname, entry)

    def _lookup(self, candidates: list[str]) -> tuple[int | None, list[Entry]]:
        return self._store.lookup(candidates)

    def _source_spec(self, fullname: str, entry: Entry) -> importlib.machinery.ModuleSpec:
        is_package = entry.path.endswith("/__init__.py")
        spec = importlib.util.spec_from_loader(
            fullname, _SourceLoader(self, entry), origin=entry.path, is_package=is_package
        )
        assert spec is not None
        spec.has_location = True  # __file__ = the workspace path
        return spec

    def _namespace_spec(self, fullname: str, rel: str) -> importlib.machinery.ModuleSpec:
        spec = importlib.machinery.ModuleSpec(fullname, _NamespaceLoader(self, rel), is_package=True)
        spec.submodule_search_locations = []
        return spec

    # -- bookkeeping ----------------------------------------------------------------------------------------

    def _keep_one_generation(self, entry: Entry) -> None:
        newer = entry.manifest_generation is not None and entry.manifest_generation > (self._checked or 0)
        if not newer or not self._loaded:
            return
        current, hashes = self._store.manifest([m.path for m in self._loaded.values()])
        changed = self._changed(hashes)
        if changed:
            paths = ", ".join(sorted(self._loaded[n].path for n in changed))
            raise ImportError(
                f"{entry.path}: the workspace changed during this execution ({paths}); run it again",
                name=entry.path,
            )
        self._checked = max(self._checked or 0, current or 0)

    def _changed(self, hashes: dict[str, str]) -> list[str]:
        return [name for name, m in self._loaded.items() if hashes.get(m.path) != m.hash]

    def compiled(self, entry: Entry) -> types.CodeType:
        return self._store.compiled(entry)

    def _record(self, name: str, loaded: Loaded) -> None:
        self._loaded[name] = loaded

    def _evict(self, names: Iterable[str]) -> list[str]:
        doomed: set[str] = set()
        stack = list(names)
        while stack:
            name = stack.pop()
            if name in doomed:
                continue
            doomed.add(name)
            stack.extend(self._importers.get(name, ()))
            stack.extend(m for m in self._loaded if m.startswith(f"{name}."))
        for name in doomed:
            self._loaded.pop(name, None)
            self._importers.pop(name, None)
            sys.modules.pop(name, None)
            parent, _, child = name.rpartition(".")
            if parent and parent not in doomed and hasattr(sys.modules.get(parent), child):
                delattr(sys.modules[parent], child)
        for importers in self._importers.values():
            importers -= doomed
        return sorted(doomed)

    def builtins_for(self, importer: str) -> dict[str, Any]:
        """Builtins for a workspace module whose ``__import__`` records which workspace modules it imports."""
        namespace = dict(builtins.__dict__)
        real_import = builtins.__import__

        def tracked_import(
            name: str,
            globals: dict[str, Any] | None = None,
            locals: dict[str, Any] | None = None,
            fromlist: Sequence[str] | None = (),
            level: int = 0,
        ) -> types.ModuleType:
            module = real_import(name, globals, locals, fromlist or (), level)
            self._note_import(importer, name, globals, fromlist or (), level)
            return module

        namespace["__import__"] = tracked_import
        return namespace

    def _note_import(
        self, importer: str, name: str, globals_: dict[str, Any] | None, fromlist: Sequence[str], level: int
    ) -> None:
        base = importlib.util.resolve_name("." * level + name, (globals_ or {}).get("__package__")) if level else name
        parts = base.split(".")
        targets = {".".join(parts[:n]) for n in range(1, len(parts) + 1)} | {f"{base}.{f}" for f in fromlist}
        for target in targets:
            if target in self._loaded and target != importer:
                self._importers.setdefault(target, set()).add(importer)


class _SourceLoader(importlib.abc.Loader):
    def __init__(self, importer: WorkspaceImporter, entry: Entry) -> None:
        self._importer = importer
        self._entry = entry

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType | None:
        return None

    def exec_module(self, module: types.ModuleType) -> None:
        assert self._entry.content is not None
        code = self._importer.compiled(self._entry)
        module.__dict__["__builtins__"] = self._importer.builtins_for(module.__name__)
        self._importer._record(module.__name__, Loaded(self._entry.path, self._entry.hash))
        try:
            exec(code, module.__dict__)
        except BaseException:
            self._importer._evict([module.__name__])
            raise

    def get_source(self, fullname: str) -> str | None:
        return self._entry.content  # lets tracebacks show workspace source lines


class _NamespaceLoader(importlib.abc.Loader):
    def __init__(self, importer: WorkspaceImporter, rel: str) -> None:
        self._importer = importer
        self._rel = rel

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType | None:
        return None

    def exec_module(self, module: types.ModuleType) -> None:
        # An __init__.py appearing later turns this into a regular package: begin() then sees it changed.
        self._importer._record(module.__name__, Loaded(f"{self._rel}/__init__.py", None))


def entry_from_raw(raw: dict[str, Any]) -> Entry:
    return Entry(
        path=str(raw["path"]),
        content=raw.get("content"),
        hash=raw.get("hash"),
        manifest_generation=raw.get("manifest_generation"),
        manifest_hash=raw.get("manifest_hash"),
        indexed=bool(raw.get("indexed")),
    )


def _with_content(entries: list[Entry]) -> Entry | None:
    return next((e for e in entries if e.content is not None), None)
