"""The baseline of ``consumer_executor``: what the consumer did before issue 8, one long-lived worker process
reused for every execution, a job over a pipe and the result back (length-prefixed JSON, as the old pool did).

Run as ``python -m bench._reused_worker``; it runs each job's code with the same ``runtime.Runner`` (no
workspace imports: the trivial workflow needs none).
"""

from __future__ import annotations

import sys
from typing import Any

from modcache_consumer import importer, protocol, runtime


class _NoStore:
    def lookup(self, paths: Any) -> Any:
        return None, []

    def manifest(self, paths: Any) -> Any:
        return None, {}

    def is_directory(self, rel: str, generation: int | None) -> bool:
        return False

    def compiled(self, entry: importer.Entry) -> Any:
        raise ImportError(entry.path)


def _read(stream: Any) -> dict[str, Any] | None:
    header = stream.read(protocol.HEADER.size)
    if len(header) < protocol.HEADER.size:
        return None
    return protocol.decode(stream.read(protocol.frame_length(header, limit=protocol.MAX_CONTROL_FRAME_BYTES)))


def main() -> None:
    incoming, outgoing = sys.stdin.buffer, sys.stdout.buffer
    hook = importer.WorkspaceImporter(store=_NoStore(), request_repair=lambda paths: None)
    runner = runtime.Runner(hook=hook)
    while (job := _read(incoming)) is not None:
        outgoing.write(protocol.encode(runner.run(job)))  # type: ignore[arg-type]
        outgoing.flush()


if __name__ == "__main__":
    main()
