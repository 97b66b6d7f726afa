"""A worker process: runs workflow code, one execution at a time, importing workspace modules from the cache.

Started by ``pool`` as ``python -m modcache_consumer.worker`` with an allow-listed environment (no database
credentials, no MODCACHE_* settings): everything it needs (the Redis URL, limits, decryption keys) arrives in
the first frame over a pipe. It never talks to PostgreSQL; a module missing from the cache is repaired by the
consumer on request (``protocol``'s repair frames).

Per execution: ``importer.begin(generation)`` (evicts modules whose hash changed), compile the workflow's code
(cached by content), call its function with the parameters (and ``context`` if it asks for one), await it if
it is a coroutine, and send back a JSON result or the error with a traceback excerpt.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import inspect
import json
import linecache
import os
import resource
import sys
import time
import traceback
import types
from typing import IO, Any

import redis

from modcache import errors, keys
from modcache_consumer import importer, messages, protocol

MAX_TRACEBACK_LINES = 30
MAX_ERROR_CHARS = 4000
COMPILE_CACHE_SIZE = 64
_INTERNAL = (os.path.dirname(__file__), "<frozen importlib._bootstrap")


class ExecutionContext:
    """What a workflow may ask for by declaring a ``context`` parameter."""

    def __init__(self, job: protocol.Job, *, secret_keys: list[str]) -> None:
        self.execution_id: str = job["execution_id"]
        self.workflow_name: str = job["workflow"]["name"]
        self.organization: dict[str, Any] | None = job["organization"]
        self.parameters: dict[str, Any] = job["parameters"]
        self._config: dict[str, Any] = job["config"]
        self._secret_keys = secret_keys

    def config_keys(self) -> list[str]:
        return sorted(self._config)

    def get_config(self, key: str, default: Any = None) -> Any:
        """A config value; a secret is decrypted here, at the moment the workflow reads it."""
        item = self._config.get(key)
        if item is None:
            return default
        if item.get("type") == "secret":
            from modcache_consumer import crypto  # loaded only by workflows that read a secret

            return crypto.Secrets(self._secret_keys).decrypt(str(item["value"]), name=key)
        return item.get("value")


class Runner:
    def __init__(self, *, hook: importer.WorkspaceImporter, init: protocol.Init) -> None:
        self._hook = hook
        self._secret_keys = init["secret_keys"]
        self._max_result_bytes = init["max_result_bytes"]
        self._compiled: collections.OrderedDict[str, types.CodeType] = collections.OrderedDict()

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
            return self._success(value, timings)
        except MemoryError as e:
            return _failure(e, timings, recycle=True)
        except BaseException as e:  # a workflow's SystemExit or KeyboardInterrupt fails it, not the worker
            return _failure(e, timings)

    def _load(self, workflow: protocol.RawWorkflow) -> Any:
        filename = workflow["path"] or f"<workflow {workflow['name']}>"
        code = self._compile(workflow["code"], filename)
        linecache.cache[filename] = (len(workflow["code"]), None, workflow["code"].splitlines(True), filename)
        module = types.ModuleType(f"workflow:{workflow['name']}")
        module.__file__ = filename
        exec(code, module.__dict__)
        function = getattr(module, workflow["function_name"], None)
        if not callable(function):
            raise LookupError(f"{filename}: no function {workflow['function_name']!r}")
        return function

    def _compile(self, source: str, filename: str) -> types.CodeType:
        key = hashlib.sha256(f"{filename}\0{source}".encode()).hexdigest()
        code = self._compiled.get(key)
        if code is None:
            code = compile(source, filename, "exec", dont_inherit=True)
            self._compiled[key] = code
            if len(self._compiled) > COMPILE_CACHE_SIZE:
                self._compiled.popitem(last=False)
        self._compiled.move_to_end(key)
        return code

    def _call(self, function: Any, job: protocol.Job) -> Any:
        kwargs = dict(job["parameters"])
        if "context" in inspect.signature(function).parameters:
            kwargs["context"] = ExecutionContext(job, secret_keys=self._secret_keys)
        value = function(**kwargs)
        if inspect.isawaitable(value):
            value = asyncio.run(_awaited(value))
        return value

    def _success(self, value: Any, timings: dict[str, float]) -> protocol.Result:
        try:
            encoded = json.dumps(value, allow_nan=False)
        except (TypeError, ValueError) as e:
            return _failed(f"the result is not JSON-serializable: {e}", timings)
        if "\\u0000" in encoded and messages.has_nul(value):
            return _failed("the result holds a NUL character (\\u0000), which PostgreSQL cannot store", timings)
        if len(encoded) > self._max_result_bytes:
            return _failed(f"the result is {len(encoded)} bytes, over the {self._max_result_bytes}-byte limit", timings)
        return {"op": "result", "status": "SUCCESS", "result": value, "error": None, "timings_ms": timings}


async def _awaited(awaitable: Any) -> Any:
    return await awaitable


def _failure(exc: BaseException, timings: dict[str, float], *, recycle: bool = False) -> protocol.Result:
    result = _failed(describe_failure(exc), timings)
    if recycle:
        result["recycle"] = True
    return result


def _failed(error: str, timings: dict[str, float]) -> protocol.Result:
    return {"op": "result", "status": "FAILED", "result": None, "error": error, "timings_ms": timings}


def describe_failure(exc: BaseException) -> str:
    """``Type: message`` on the first line, then the traceback's last lines without this package's frames."""
    summary = traceback.TracebackException.from_exception(exc)
    summary.stack = traceback.StackSummary.from_list([f for f in summary.stack if not f.filename.startswith(_INTERNAL)])
    lines = "".join(summary.format()).splitlines()
    head = _headline(exc)
    text = "\n".join([head, *lines[-MAX_TRACEBACK_LINES:]]).replace("\x00", "\\x00")  # PostgreSQL text
    return errors.truncate(text, MAX_ERROR_CHARS)


def _headline(exc: BaseException) -> str:
    if isinstance(exc, SyntaxError) and exc.filename:  # str() would show only the file's basename
        return f"{type(exc).__name__}: {exc.msg} ({exc.filename}, line {exc.lineno})"
    message = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


def _ms_since(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 3)


# -- process plumbing ---------------------------------------------------------------------------------------


def _take_pipes() -> tuple[IO[bytes], IO[bytes]]:
    """The protocol pipes on private descriptors; stdin becomes /dev/null and stdout goes to stderr."""
    incoming = os.fdopen(os.dup(0), "rb")
    outgoing = os.fdopen(os.dup(1), "wb")
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    os.dup2(2, 1)
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    return incoming, outgoing


def _limit_memory(limit_bytes: int | None) -> None:
    if limit_bytes:
        resource.setrlimit(resource.RLIMIT_AS, (limit_bytes, limit_bytes))


def main() -> None:
    incoming, outgoing = _take_pipes()
    init: Any = protocol.read_frame(incoming)
    if init is None or init.get("op") != "init":
        sys.exit("modcache worker: expected an init frame")

    def repair(paths: list[str]) -> None:
        protocol.write_frame(outgoing, {"op": "repair", "paths": paths})
        answer = protocol.read_frame(incoming)
        if answer is None:
            os._exit(0)  # the consumer is gone
        if answer.get("error"):
            raise ImportError(f"{', '.join(paths)}: not in the module cache and repair failed: {answer['error']}")

    client = redis.Redis.from_url(init["redis_url"], decode_responses=True, socket_timeout=30)
    store = importer.WorkspaceStore(client=client, keyspace=keys.KeySpace(init["key_prefix"]))
    hook = importer.WorkspaceImporter(store=store, request_repair=repair)
    sys.meta_path.append(hook)
    runner = Runner(hook=hook, init=init)
    _limit_memory(init["memory_limit_bytes"])
    protocol.write_frame(outgoing, {"op": "ready", "pid": os.getpid()})
    while (frame := protocol.read_frame(incoming)) is not None and frame["op"] != "exit":
        if frame["op"] == "run":
            protocol.write_frame(outgoing, runner.run(frame))  # type: ignore[arg-type]


if __name__ == "__main__":
    main()
