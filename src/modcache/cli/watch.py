"""``sync --watch``: run ``modcache.watcher.Watcher`` until SIGINT or SIGTERM, printing one line per sync.

The watcher does the work (LISTEN with reconnect, keyspace-event repair, periodic resync); this module wires it
to the CLI's settings, prints what its ``Observer`` hears, and stops it cleanly on a signal (exit code 0).
"""

from __future__ import annotations

import asyncio
import datetime
import signal
from collections.abc import Callable, Coroutine
from typing import Any

import click

from modcache import errors, plan, settings, watcher, wiring
from modcache.cli import render, runtime

Clock = Callable[[], datetime.datetime]
SIGNALS = (signal.SIGINT, signal.SIGTERM)


def utc_now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


class EchoObserver:
    """Prints each sync that did something (and every full resync), failures and connectivity changes."""

    def __init__(self, *, echo: Callable[[str], None] = click.echo, clock: Clock = utc_now) -> None:
        self._echo = echo
        self._clock = clock

    def on_sync(self, report: plan.Report, trigger: str) -> None:
        if report.plan or report.full:
            self._echo(render.sync_line(report, trigger, now=self._clock()))
        for rejected in report.plan.rejected if report.full else ():
            self._echo(f"  rejected {rejected}")

    def on_sync_failed(self, error: errors.ModcacheError, trigger: str) -> None:
        self._say(f"sync ({trigger}) failed: {error}; retrying")

    def on_listener(self, connected: bool, detail: str) -> None:
        self._say(f"PostgreSQL listener {'connected' if connected else 'down'}: {detail}")

    def on_keyspace(self, active: bool, detail: str) -> None:
        self._say(f"Redis keyspace events {'on' if active else 'off'}: {detail}")

    def _say(self, text: str) -> None:
        self._echo(f"{self._clock().isoformat(timespec='seconds')} {text}")


def make_watcher(wired: wiring.Wired, observer: watcher.Observer) -> watcher.Watcher:
    return wired.watcher(observer=observer)


async def watch(config: settings.Settings, *, observer: watcher.Observer | None = None) -> None:
    """Keep the cache converged until SIGINT/SIGTERM."""
    async with runtime.wired(config) as wired:
        the_watcher = make_watcher(wired, observer or EchoObserver())
        click.echo(f"watching {config.key_prefix!r}; SIGINT or SIGTERM stops")
        await run_until_stopped(the_watcher.run())
        click.echo("stopped")


async def run_until_stopped(*coroutines: Coroutine[Any, Any, None]) -> None:
    """Run ``coroutines`` until one of them ends or SIGINT/SIGTERM arrives, then cancel the rest.

    A signal is a normal way to stop (no error); an error of any coroutine is re-raised once all are done.
    """
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in SIGNALS:
        loop.add_signal_handler(signum, stop.set)
    tasks: list[asyncio.Task[Any]] = [asyncio.create_task(c) for c in coroutines]
    tasks.append(asyncio.create_task(stop.wait()))
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for signum in SIGNALS:
            loop.remove_signal_handler(signum)
        await _cancel_all(tasks)


async def _cancel_all(tasks: list[asyncio.Task[Any]]) -> None:
    for task in tasks:
        task.cancel()
    failure: BaseException | None = None
    for task in tasks:
        try:
            await task
        except asyncio.CancelledError:
            pass
        except Exception as e:
            failure = failure or e
    if failure is not None:
        raise failure
