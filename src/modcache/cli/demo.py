"""``modcache demo``: the main job, end to end, on a laptop with nothing installed.

1. With no ``MODCACHE_DATABASE_URL``/``MODCACHE_REDIS_URL``, start embedded PostgreSQL and Redis under the state
   directory (``modcache.embedded``); with them set, use those services.
2. Migrate, and load the example workspace shipped in ``modcache/example_workspace`` (a package, a submodule, a
   plain module) through the same writer as ``modules load-dir``.
3. Run the reconciler in watch mode (``modcache.watcher``), printing every sync.
4. Show the original bug being repaired live: DEL one content key while its index entry stays (a partial
   expiry), and print the cache before and after and how long the repair took. Then commit a change in
   PostgreSQL and show it reach the cache through NOTIFY.
5. Keep watching until Ctrl-C (or exit 0 right away with ``--exit-after-demo``).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterator
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

import click

from modcache import db, embedded, errors, modules, plan, settings, watcher, wiring
from modcache.cli import loader, runtime, watch

T = TypeVar("T")

EXPIRED_PATH = "shared/halopsa/__init__.py"
EDITED_PATH = "modules/billing.py"
EDITED_CONTENT = b'"""Billing helpers (edited live by the demo)."""\n\nHOURLY_RATE = 135\n'
WAIT_S = 30.0


class DemoFailed(errors.ModcacheError):
    """A step of the demo did not happen in time."""


class DemoObserver(watch.EchoObserver):
    """Prints what the watcher reports (indented) and lets the demo await a sync with a given effect."""

    def __init__(self, *, echo: Callable[[str], None]) -> None:
        super().__init__(echo=lambda line: echo(f"    [watch] {line}"))
        self.syncs: list[tuple[plan.Report, str, float]] = []
        self.keyspace_active: bool | None = None
        self._changed = asyncio.Event()

    def on_sync(self, report: plan.Report, trigger: str) -> None:
        super().on_sync(report, trigger)
        self.syncs.append((report, trigger, time.perf_counter()))
        self._changed.set()

    def on_keyspace(self, active: bool, detail: str) -> None:
        super().on_keyspace(active, detail)
        self.keyspace_active = active
        self._changed.set()

    async def wait_for(self, found: Callable[[], T | None], what: str, timeout_s: float = WAIT_S) -> T:
        try:
            async with asyncio.timeout(timeout_s):
                while (result := found()) is None:
                    self._changed.clear()
                    await self._changed.wait()
        except TimeoutError:
            raise DemoFailed(f"demo: {what} did not happen within {timeout_s:.0f} s") from None
        return result

    def ready(self) -> bool | None:
        """True once the first full resync ran and the keyspace subscription is settled (either way)."""
        done = any(report.full for report, _, _ in self.syncs) and self.keyspace_active is not None
        return True if done else None

    def repair_of(self, path: str, reasons: set[plan.Reason], since: int) -> tuple[str, float] | None:
        """(trigger, when) of the first sync after the ``since``-th that wrote ``path`` for one of ``reasons``."""
        for report, trigger, at in self.syncs[since:]:
            if report.repaired and any(i.path == path and i.reason in reasons for i in report.plan.items):
                return trigger, at
        return None


def main(config: settings.Settings, *, exit_after_demo: bool) -> None:
    """Start what is not configured, run the demo, stop what was started."""
    try:
        with _services(config) as ready:
            runtime.run(watch.run_until_stopped(_demo(ready, exit_after_demo=exit_after_demo)))
    except KeyboardInterrupt:
        raise click.exceptions.Abort() from None


@contextlib.contextmanager
def _services(config: settings.Settings) -> Iterator[settings.Settings]:
    wanted = {"postgres": config.database_url is None, "redis": config.redis_url is None}
    if not any(wanted.values()):
        yield config
        return
    names = " and ".join(n for n, w in (("PostgreSQL", wanted["postgres"]), ("Redis", wanted["redis"])) if w)
    click.echo(f"starting embedded {names} under {config.state_dir} …")
    started = time.perf_counter()
    with embedded.embedded_servers(config.state_dir, **wanted) as urls:
        click.echo(f"  up in {time.perf_counter() - started:.2f} s")
        yield runtime.with_urls(config, urls)
    click.echo("embedded servers stopped")


async def _demo(config: settings.Settings, *, exit_after_demo: bool) -> None:
    url = runtime.required(config.database_url, "database_url")
    redis_url = runtime.required(config.redis_url, "redis_url")
    click.echo(
        f"PostgreSQL {errors.redact_url(url)}, Redis {errors.redact_url(redis_url)}, prefix {config.key_prefix!r}"
    )
    await db.upgrade(url)
    click.echo("1. schema migrated: workspace_files & co. + the NOTIFY trigger")
    async with runtime.wired(config) as wired:
        await _load_example(wired)
        observer = DemoObserver(echo=click.echo)
        the_watcher = watch.make_watcher(wired, observer)
        watching = asyncio.create_task(the_watcher.run(), name="modcache-demo-watcher")
        try:
            click.echo("3. reconciler in watch mode (LISTEN/NOTIFY + Redis keyspace events + periodic resync)")
            await observer.wait_for(observer.ready, "the first full resync")
            await _show_partial_expiry(wired, the_watcher, observer)
            await _show_commit(wired, observer)
            if exit_after_demo:
                click.echo("demo done (--exit-after-demo)")
                return
            _print_try_it(config, url, redis_url)
            await watching
        finally:
            watching.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watching


async def _load_example(wired: wiring.Wired) -> None:
    with resources.as_file(resources.files("modcache") / "example_workspace") as directory:
        paths = [p for p, _ in loader.workspace_files(Path(directory))]
        result = await loader.load_into(wired.source, Path(directory))
    click.echo(f"2. example workspace loaded: {', '.join(paths)} ({len(result.changed)} changed)")
    if result.rejected:
        raise DemoFailed(f"demo: example modules rejected: {result.rejected}")


async def _show_partial_expiry(wired: wiring.Wired, the_watcher: watcher.Watcher, observer: DemoObserver) -> None:
    cache, ks = wired.cache, wired.cache.keyspace
    key = ks.content(EXPIRED_PATH)
    click.echo(f"4. partial expiry: DEL {key} (the index keeps {EXPIRED_PATH!r})")
    since = len(observer.syncs)
    started = time.perf_counter()
    async with cache.client.pipeline(transaction=True) as pipe:  # the "before" is read atomically with the DEL
        pipe.delete(key)
        _read_key_state(pipe, key, ks.index)
        _, *before = await pipe.execute()
    _print_key_state("before", *before)
    if not observer.keyspace_active:
        click.echo("   keyspace events are off here: asking for a full resync instead")
        the_watcher.request_resync(watcher.MANUAL)
    trigger, repaired_at = await observer.wait_for(
        lambda: observer.repair_of(EXPIRED_PATH, {plan.Reason.MISSING}, since), f"the repair of {EXPIRED_PATH}"
    )
    async with cache.client.pipeline(transaction=True) as pipe:
        _read_key_state(pipe, key, ks.index)
        pipe.get(key)
        *after, value = await pipe.execute()
    _print_key_state("after ", *after)
    cached = modules.decode_cached(value)
    click.echo(f"           value {{path: {cached['path']!r}, hash: {cached['hash'][:12]}…, content: …}}")
    click.echo(f"   repaired {(repaired_at - started) * 1000:.1f} ms after the DEL (trigger: {trigger})")


def _read_key_state(pipe: Any, key: str, index: str) -> None:
    pipe.exists(key)
    pipe.sismember(index, EXPIRED_PATH)
    pipe.scard(index)


def _print_key_state(label: str, exists: int, listed: int, size: int) -> None:
    state = "present" if exists else "ABSENT (a worker importing shared.halopsa gets ImportError)"
    click.echo(f"   {label}: content key {state}; index lists it: {bool(listed)}; SCARD index = {size}")


async def _show_commit(wired: wiring.Wired, observer: DemoObserver) -> None:
    click.echo(f"5. a commit in PostgreSQL: {EDITED_PATH} gets HOURLY_RATE = 135")
    since = len(observer.syncs)
    started = time.perf_counter()
    await wired.source.put_module(EDITED_PATH, EDITED_CONTENT)
    trigger, updated_at = await observer.wait_for(
        lambda: observer.repair_of(EDITED_PATH, {plan.Reason.STALE, plan.Reason.MISSING}, since),
        f"the update of {EDITED_PATH}",
    )
    cached = modules.decode_cached(await wired.cache.read_module(EDITED_PATH) or "")
    fresh = cached["hash"] == modules.content_hash(EDITED_CONTENT)
    click.echo(
        f"   cache {'updated' if fresh else 'NOT updated'} {(updated_at - started) * 1000:.1f} ms after the commit "
        f"(trigger: {trigger})"
    )
    if not fresh:
        raise DemoFailed(f"demo: the cache holds another version of {EDITED_PATH}")


def _print_try_it(config: settings.Settings, url: str, redis_url: str) -> None:
    click.echo("watching; press Ctrl-C to stop. In another terminal, try:")
    click.echo(
        f"   export MODCACHE_DATABASE_URL={errors.redact_url(url)} MODCACHE_REDIS_URL={errors.redact_url(redis_url)}"
    )
    click.echo(f"   export MODCACHE_KEY_PREFIX={config.key_prefix}")
    click.echo("   modcache status; modcache modules put shared/new.py some_file.py; modcache sync --once --dry-run")
