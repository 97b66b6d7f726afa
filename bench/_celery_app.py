"""The Celery side of ``bench/consumer_throughput.py``: the same trivial task, Celery prefork ``-c 2``,
``acks_late``, PostgreSQL result backend. Runs only in the benchmark's own Celery virtualenv (never imported by
modcache): as the worker's app (``celery -A _celery_app worker``) and as the driver (``python _celery_app.py
drive N WARMUP``), which publishes and waits until every result row is stored, then prints the seconds taken.

Configuration from the environment: ``BENCH_CELERY_BROKER`` (amqp URL), ``BENCH_CELERY_BACKEND``
(``db+postgresql+psycopg2://...``), ``BENCH_CELERY_QUEUE``, ``BENCH_CELERY_DSN`` (the same database, for the
driver's count of stored results).
"""

from __future__ import annotations

import os
import sys
import time

from celery import Celery

app = Celery("modcache_bench", broker=os.environ["BENCH_CELERY_BROKER"], backend=os.environ["BENCH_CELERY_BACKEND"])
app.conf.update(
    task_acks_late=True,
    task_default_queue=os.environ["BENCH_CELERY_QUEUE"],
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    worker_enable_remote_control=False,
    worker_send_task_events=False,
    broker_connection_retry_on_startup=True,
)


@app.task(name="trivial")
def trivial(n: int) -> int:
    return n


def _stored(cur: object) -> int:
    cur.execute("SELECT to_regclass('celery_taskmeta') IS NOT NULL")  # type: ignore[attr-defined]
    if not cur.fetchone()[0]:  # type: ignore[attr-defined]
        return 0  # the worker creates the table with the first result
    cur.execute("SELECT count(*) FROM celery_taskmeta WHERE status = 'SUCCESS'")  # type: ignore[attr-defined]
    return int(cur.fetchone()[0])  # type: ignore[attr-defined]


def _burst(n: int, cur: object, already: int) -> None:
    for i in range(n):
        app.send_task("trivial", args=[i])
    while _stored(cur) < already + n:
        time.sleep(0.01)


def drive(n: int, warmup: int) -> None:
    import psycopg2

    conn = psycopg2.connect(os.environ["BENCH_CELERY_DSN"])
    conn.autocommit = True
    try:
        cur = conn.cursor()
        _burst(warmup, cur, 0)
        started = time.perf_counter()
        _burst(n, cur, warmup)
        print(f"{time.perf_counter() - started:.6f}", flush=True)
    finally:
        conn.close()


if __name__ == "__main__" and sys.argv[1:2] == ["drive"]:
    drive(int(sys.argv[2]), int(sys.argv[3]))
