"""Inside one execution process: run one workflow, importing workspace modules through the consumer.

The template (``template``) clones this process, isolates it (``sandbox``) and calls ``main``; nothing here
outlives the execution, and no interpreter ever runs code of two executions. The process holds no Redis,
PostgreSQL or AMQP client or credential and no decryption key: module content arrives over the execution's
channel (``ChannelStore``; the consumer verified each content's SHA-256), and a secret config is decrypted by the
consumer when the workflow reads it (``ExecutionContext.get_config``), for this execution's organization only.

Per execution: read the ``Job``, compile the workflow's code, call its function with the parameters (and
``context`` if it asks for one), await it if it is a coroutine, and send back one JSON ``Result`` or the error
with a traceback excerpt; then exit. ``Memory`` is what the template keeps between executions and every
execution inherits: verified workspace lookups at one generation and their compiled code (public code; never
parameters, configs, results or workflow code).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import inspect
import json
import linecache
import os
import socket
import sys
import time
import traceback
import types
from collections.abc import Callable, Sequence
from typing import Any

from modcache import errors
from modcache_consumer import importer, messages, protocol

MAX_TRACEBACK_LINES = 30
MAX_ERROR_CHARS = messages.MAX_ERROR_CHARS
DEFAULT_MAX_RESULT_BYTES = 1024**2
_INTERNAL = (__file__.rsplit("/", 1)[0], "<frozen importlib._bootstrap")


@dataclasses.dataclass
class Memory:
    """Verified lookups at one generation and compiled module code by (path, hash): the template's, inherited.

    ``code`` is bounded by the source bytes it was compiled from (``max_code_bytes``, least recently used out),
    and ``learn`` compiles no module above ``max_module_bytes`` and at most ``max_lesson_bytes`` of source per
    lesson (attack-8c C1): the template compiles in its control loop, and every clone inherits what it keeps."""

    generation: int | None = None
    lookups: dict[tuple[str, ...], list[importer.Entry]] = dataclasses.field(default_factory=dict)
    directories: dict[str, bool] = dataclasses.field(default_factory=dict)
    code: collections.OrderedDict[tuple[str, str], tuple[types.CodeType, int]] = dataclasses.field(
        default_factory=collections.OrderedDict
    )
    code_bytes: int = 0  # the source bytes of what ``code`` holds
    max_code: int = 4096
    max_code_bytes: int = protocol.MAX_CODE_CACHE_SOURCE_BYTES
    max_module_bytes: int = protocol.MAX_TAUGHT_MODULE_BYTES
    max_lesson_bytes: int = protocol.MAX_LESSON_SOURCE_BYTES

    def learn(self, frame: protocol.Learned) -> None:
        """Take verified lookups (only the newest generation's are kept) and compile their content."""
        if self.generation is None or frame["generation"] > self.generation:
            self.generation, self.lookups, self.directories = frame["generation"], {}, {}
        if frame["generation"] != self.generation:
            return
        self.directories.update((str(rel), bool(found)) for rel, found in frame.get("directories", []))
        budget = self.max_lesson_bytes
        for candidates, raw in frame["lookups"]:
            entries = [importer.entry_from_raw(e) for e in raw]
            size = sum(len(e.content) for e in entries if e.content is not None)
            if any(e.content is not None and len(e.content) > self.max_module_bytes for e in entries) or size > budget:
                continue  # served over the channel on demand, compiled by the execution that imports it
            budget -= size
            self.lookups[tuple(candidates)] = entries
            for entry in entries:
                if entry.content is not None and entry.hash is not None:
                    try:
                        self.compile(entry)
                    except Exception:  # SyntaxError, RecursionError, MemoryError: tenant code
                        continue  # the execution that imports it compiles it again and gets the error itself

    def compile(self, entry: importer.Entry) -> types.CodeType:
        assert entry.content is not None
        key = (entry.path, entry.hash or "")
        held = self.code.get(key)
        if held is not None:
            self.code.move_to_end(key)
            return held[0]
        code = compile(entry.content, entry.path, "exec", dont_inherit=True)
        size = len(entry.content)
        if size <= self.max_code_bytes:
            while self.code and (len(self.code) >= self.max_code or self.code_bytes + size > self.max_code_bytes):
                self.code_bytes -= self.code.popitem(last=False)[1][1]
            self.code[key] = (code, size)
            self.code_bytes += size
        return code


class ChannelStore:
    """``importer.Store`` over the channel; lookups the template knew at this generation cost no round trip."""

    def __init__(self, *, channel: protocol.Channel, memory: Memory, generation: int) -> None:
        self._channel = channel
        self._memory = memory
        self._generation = generation
        self._directories: dict[tuple[str, int | None], bool] = {}
        self.repaired = False  # after a repair, the template's memory is older than the cache

    def _remembered(self) -> bool:
        return self._memory.generation == self._generation and not self.repaired

    def lookup(self, paths: Sequence[str]) -> tuple[int | None, list[importer.Entry]]:
        if self._remembered():
            known = self._memory.lookups.get(tuple(paths))
            if known is not None:
                return self._generation, known
        answer = self._channel.ask({"op": "lookup", "paths": list(paths), "generation": self._generation})
        _raise_unavailable(answer, paths[0])
        return answer["generation"], [importer.entry_from_raw(e) for e in answer["entries"]]

    def manifest(self, paths: Sequence[str]) -> tuple[int | None, dict[str, str]]:
        answer = self._channel.ask({"op": "manifest", "paths": list(paths)})
        _raise_unavailable(answer, paths[0] if paths else "manifest")
        return answer["generation"], dict(answer["hashes"])

    def is_directory(self, rel: str, generation: int | None) -> bool:
        key = (rel, generation)
        if self._remembered() and generation == self._generation and rel in self._memory.directories:
            return self._memory.directories[rel]
        if key not in self._directories:
            answer = self._channel.ask({"op": "directory", "rel": rel, "generation": generation})
            _raise_unavailable(answer, rel)
            self._directories[key] = bool(answer["directory"])
        return self._directories[key]

    def compiled(self, entry: importer.Entry) -> types.CodeType:
        return self._memory.compile(entry)


def _raise_unavailable(answer: dict[str, Any], path: str) -> None:
    if answer.get("error"):
        raise ImportError(f"{path}: {answer['error']}")


class ExecutionContext:
    """What a workflow may ask for by declaring a ``context`` parameter."""

    def __init__(self, job: protocol.Job, *, channel: protocol.Channel | None = None) -> None:
        self.execution_id: str = job["execution_id"]
        self.workflow_name: str = job["workflow"]["name"]
        self.organization: dict[str, Any] | None = job["organization"]
        self.parameters: dict[str, Any] = job["parameters"]
        #: 1 on the first run; a workflow with ``retries_on_crash`` sees 2, 3, ... on the runs after its
        #: consumer died mid-run (``executions.attempt`` holds the same number)
        self.attempt: int = int(job.get("attempt", 1))
        self._config: dict[str, Any] = job["config"]
        self._channel = channel

    def config_keys(self) -> list[str]:
        return sorted(self._config)

    def get_config(self, key: str, default: Any = None) -> Any:
        """A config value; a secret is decrypted by the consumer at the moment the workflow reads it."""
        item = self._config.get(key)
        if item is None:
            return default
        if item.get("type") == "secret" and "value" not in item:
            if self._channel is None:
                raise errors.ConfigError(key, "secret configs are not available here")
            answer = self._channel.ask({"op": "secret", "key": key})
            if answer.get("error"):
                raise errors.ConfigError(key, str(answer["error"]))
            return answer["value"]
        return item.get("value")


class Terminated(BaseException):
    """SIGTERM (the deadline): unwinds the workflow so its ``finally`` blocks run; no result is sent."""


_terminating: list[bool] = []


def terminated(signum: int, frame: object) -> None:
    _terminating.append(True)
    raise Terminated("the execution was terminated (SIGTERM)")


class Runner:
    def __init__(self, *, hook: importer.WorkspaceImporter, channel: protocol.Channel | None = None) -> None:
        self._hook = hook
        self._channel = channel

    def run(self, job: protocol.Job) -> protocol.Result:
        started = time.perf_counter()
        timings: dict[str, float] = {}
        try:
            self._hook.begin(job["generation"])
            timings["prepare_ms"] = _ms_since(started)
            function = self._load(job["workflow"])
            timings["load_ms"] = _ms_since(started) - timings["prepare_ms"]
            value = self._call(function, job)
            timings["run_ms"] = _ms_since(started) - timings["prepare_ms"] - timings["load_ms"]
            return _success(value, timings, job.get("max_result_bytes", DEFAULT_MAX_RESULT_BYTES))
        except BaseException as e:  # a workflow's SystemExit or KeyboardInterrupt fails it like any error
            return _failed(describe_failure(e), timings)

    def _load(self, workflow: protocol.RawWorkflow) -> Any:
        filename = workflow["path"] or f"<workflow {workflow['name']}>"
        code = compile(workflow["code"], filename, "exec", dont_inherit=True)
        linecache.cache[filename] = (len(workflow["code"]), None, workflow["code"].splitlines(True), filename)
        module = types.ModuleType(f"workflow:{workflow['name']}")
        module.__file__ = filename
        exec(code, module.__dict__)
        function = getattr(module, workflow["function_name"], None)
        if not callable(function):
            raise LookupError(f"{filename}: no function {workflow['function_name']!r}")
        return function

    def _call(self, function: Any, job: protocol.Job) -> Any:
        kwargs = dict(job["parameters"])
        if "context" in inspect.signature(function).parameters:
            kwargs["context"] = ExecutionContext(job, channel=self._channel)
        value = function(**kwargs)
        if inspect.isawaitable(value):
            value = asyncio.run(_awaited(value))
        return value


async def _awaited(awaitable: Any) -> Any:
    return await awaitable


def _success(value: Any, timings: dict[str, float], max_result_bytes: int) -> protocol.Result:
    try:
        encoded = json.dumps(value, allow_nan=False)
    except (TypeError, ValueError, RecursionError) as e:
        return _failed(f"the result is not JSON-serializable: {e}", timings)
    if "\\u0000" in encoded and messages.has_nul(value):
        return _failed("the result holds a NUL character (\\u0000), which PostgreSQL cannot store", timings)
    if len(encoded) > max_result_bytes:
        return _failed(f"the result is {len(encoded)} bytes, over the {max_result_bytes}-byte limit", timings)
    return {"op": "result", "status": "SUCCESS", "result": value, "error": None, "timings_ms": timings}


def _failed(error: str, timings: dict[str, float]) -> protocol.Result:
    return {"op": "result", "status": "FAILED", "result": None, "error": error, "timings_ms": timings}


def describe_failure(exc: BaseException) -> str:
    """``Type: message`` on the first line, then the traceback's last lines without this package's frames."""
    summary = traceback.TracebackException.from_exception(exc)
    summary.stack = traceback.StackSummary.from_list([f for f in summary.stack if not f.filename.startswith(_INTERNAL)])
    lines = "".join(summary.format()).splitlines()
    head = _headline(exc)
    text = "\n".join([head, *lines[-MAX_TRACEBACK_LINES:]]).replace("\x00", "\\x00")  # PostgreSQL text
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")  # an unpaired surrogate is not Unicode
    return errors.truncate(text, MAX_ERROR_CHARS)


def _headline(exc: BaseException) -> str:
    if isinstance(exc, SyntaxError) and exc.filename:  # str() would show only the file's basename
        return f"{type(exc).__name__}: {exc.msg} ({exc.filename}, line {exc.lineno})"
    message = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


def _ms_since(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 3)


_REHEARSAL = "def run(n, context=None):\n    return {'n': n}\n"


def rehearse() -> None:
    """In a spare, before its job: take the path a job takes once, on a trivial workflow of our own (decode a
    frame, compile, load, inspect and call a function, encode its result), so the copy-on-write faults of the
    template's pages that path touches are taken while the spare waits, not after its job arrived. Leaves nothing
    a job could see (no module registered, nothing cached, no output)."""
    frame = protocol.decode(protocol.encode({"op": "run", "parameters": {"n": 1}})[protocol.HEADER.size :])
    module = types.ModuleType("workflow:rehearsal")
    exec(compile(_REHEARSAL, "<rehearsal>", "exec", dont_inherit=True), module.__dict__)
    function = module.__dict__["run"]
    kwargs = dict(frame["parameters"])
    if "context" in inspect.signature(function).parameters:
        kwargs["context"] = None
    value = function(**kwargs)
    protocol.encode(_success(value, {"run_ms": _ms_since(time.perf_counter())}, DEFAULT_MAX_RESULT_BYTES))


def main(*, channel_fd: int, memory: Memory, isolate: Callable[[dict[str, Any]], None] = lambda job: None) -> int:
    """Wait for the one job this process exists for on its channel, ``isolate`` (limits, uid) before any of it
    runs, run it; returns the exit code (0 too when the channel closed before a job: a spare dropped)."""
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    os.set_inheritable(channel_fd, False)  # subprocess children never get it (a fork still does)
    channel = protocol.Channel(socket.socket(fileno=channel_fd))
    job: Any = channel.receive()
    if job is None:
        return 0
    if job.get("op") != "run":
        return 2
    received = time.perf_counter()
    isolate(job)
    isolated_ms = _ms_since(received)
    store = ChannelStore(channel=channel, memory=memory, generation=int(job["generation"]))
    hook = importer.WorkspaceImporter(store=store, request_repair=lambda paths: _repair(channel, store, paths))
    sys.meta_path.append(hook)
    result = Runner(hook=hook, channel=channel).run(job)
    result["timings_ms"]["isolate_ms"] = isolated_ms
    sys.stdout.flush()
    sys.stderr.flush()
    if _terminating:
        return 128 + 15  # stopped at the deadline: the executor reports TIMEOUT
    try:
        channel.send(result)
    except (TypeError, ValueError, RecursionError) as e:  # the workflow replaced something json needs
        channel.send(_failed(f"the result could not be sent: {type(e).__name__}", {}))
    channel.finish()  # EOF for the consumer now, not when the process is gone: nothing can follow the result
    return 0


def _repair(channel: protocol.Channel, store: ChannelStore, paths: list[str]) -> None:
    store.repaired = True
    answer = channel.ask({"op": "repair", "paths": paths})
    if answer.get("error"):
        raise ImportError(f"{', '.join(paths)}: not in the module cache and repair failed: {answer['error']}")
