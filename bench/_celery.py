"""Celery for the side-by-side benchmark: its own virtualenv (a benchmark dependency, never a runtime one),
a prefork worker ``-c 2`` with ``acks_late`` and the PostgreSQL result backend, and the driver
(``bench/_celery_app.py``) that publishes the trivial task and waits for every result row.

``MODCACHE_BENCH_CELERY_VENV`` (default ``~/.cache/modcache-bench/celery-venv``) is created on first use with
pip: ``celery`` (``CELERY_VERSION``), ``psycopg2-binary`` and ``sqlalchemy`` for ``db+postgresql+psycopg2://``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import aio_pika

from bench import _consumer_kit as kit

CELERY_VERSION = "5.7.0"
HERE = Path(__file__).parent
VENV = Path(os.environ.get("MODCACHE_BENCH_CELERY_VENV", Path.home() / ".cache/modcache-bench/celery-venv"))


def ensure_venv() -> Path:
    """The Celery virtualenv's python, created (once) when missing."""
    python = VENV / "bin" / "python"
    stamp = VENV / f".celery-{CELERY_VERSION}"
    if not stamp.exists():
        print(f"  creating the benchmark's Celery virtualenv in {VENV}", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
        packages = [f"celery=={CELERY_VERSION}", "psycopg2-binary", "sqlalchemy>=2"]
        subprocess.run([str(python), "-m", "pip", "install", "-q", *packages], check=True)
        stamp.touch()
    return python


def _backend_url(url: str) -> str:
    return "db+postgresql+psycopg2://" + url.split("://", 1)[1]


async def throughput(url: str, n: int, warmup: int) -> float:
    """Executions per second of Celery on the same trivial task (after ``warmup``), results stored."""
    python = ensure_venv()
    queue = f"bench-celery-{uuid.uuid4().hex[:8]}"
    env = {
        **os.environ,
        "BENCH_CELERY_BROKER": kit.AMQP_URL,
        "BENCH_CELERY_BACKEND": _backend_url(url),
        "BENCH_CELERY_QUEUE": queue,
        "BENCH_CELERY_DSN": url,
        "PYTHONPATH": str(HERE),
    }
    worker = await asyncio.create_subprocess_exec(
        str(python), "-m", "celery", "-A", "_celery_app", "worker", "-c", "2", "-P", "prefork", "-Q", queue,
        "--without-heartbeat", "--without-gossip", "--without-mingle", "--loglevel", "WARNING",
        env=env, cwd=HERE, stdout=asyncio.subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        driver = await asyncio.create_subprocess_exec(
            str(python), str(HERE / "_celery_app.py"), "drive", str(n), str(warmup),
            env=env, cwd=HERE, stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, _ = await asyncio.wait_for(driver.communicate(), 900)
        assert driver.returncode == 0, "the Celery driver failed"
        return n / float(out.decode().strip().splitlines()[-1])
    finally:
        with contextlib.suppress(ProcessLookupError):
            worker.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(worker.wait(), 30)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(worker.pid, signal.SIGKILL)
            await worker.wait()
        await _delete(queue)


async def _delete(queue: str) -> None:
    connection = await aio_pika.connect(kit.AMQP_URL)
    try:
        channel = await connection.channel()
        await channel.queue_delete(queue)
        await channel.exchange_delete(queue)
    finally:
        await connection.close()
