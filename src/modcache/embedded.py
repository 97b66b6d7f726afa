"""Local servers for the zero-install demo and the test suite.

``test_services`` yields URLs for PostgreSQL, Redis and RabbitMQ: the configured ones (``MODCACHE_TEST_*``)
when they answer, otherwise embedded PostgreSQL/Redis from wheels and a private RabbitMQ node from the OS
package; if RabbitMQ is not installed it says exactly how to install it.

TEMPORARY: only checks the configured services; starting embedded servers is being written.
"""

from __future__ import annotations

import contextlib
import os
import socket
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

DEFAULTS = {
    "postgres": "postgresql://postgres@127.0.0.1:5432/postgres",
    "redis": "redis://127.0.0.1:6379/0",
    "amqp": "amqp://guest:guest@127.0.0.1:5672/",
}


def reachable(url: str, timeout_s: float = 1.0) -> bool:
    parts = urllib.parse.urlsplit(url)
    default_port = {"postgresql": 5432, "redis": 6379, "amqp": 5672}.get(parts.scheme, 0)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or default_port), timeout_s):
            return True
    except OSError:
        return False


@contextlib.contextmanager
def test_services(state_dir: Path) -> Iterator[dict[str, str]]:
    urls = {name: os.environ.get(f"MODCACHE_TEST_{name.upper()}_URL", default) for name, default in DEFAULTS.items()}
    missing = [name for name, url in urls.items() if not reachable(url)]
    if missing:
        raise RuntimeError(f"services not reachable: {', '.join(missing)}")
    yield urls
