"""The core ``modcache`` commands: ``db``, ``sync``, ``modules``, ``status`` and ``demo``.

Each command is a thin layer: settings from the environment and flags (``runtime``), one call into the engine or
an adapter, the result printed by ``render``. Errors are ``modcache.errors`` and become one line and an exit code
in ``cli.main`` (0 ok, 1 failed, 2 bad usage, setting or input).
"""

from __future__ import annotations

import datetime
import json
import sys
from pathlib import Path
from typing import Any, BinaryIO

import click

from modcache import db, errors, pgsource, plan, settings
from modcache.cli import demo as demo_module
from modcache.cli import loader, render, runtime, watch

EXIT_FAILED = 1
EXIT_BAD_INPUT = 2


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _echo_lines(lines: list[str]) -> None:
    for line in lines:
        click.echo(line)


# -- db ----------------------------------------------------------------------------------------------------------

database_url_option = click.option("--database-url", metavar="URL", help="PostgreSQL URL [env MODCACHE_DATABASE_URL].")


@click.group("db")
def db_group() -> None:
    """The source schema: migrations and the NOTIFY trigger."""


@db_group.command("upgrade")
@database_url_option
def db_upgrade(database_url: str | None) -> None:
    """Create or migrate modcache's tables (Bifrost-shaped) and the NOTIFY trigger."""
    url = runtime.required(runtime.load_settings(database_url=database_url).database_url, "database_url")
    runtime.run(db.upgrade(url))
    click.echo(f"migrated {errors.redact_url(url)} to the latest revision")


@db_group.command("install-trigger")
@database_url_option
def db_install_trigger(database_url: str | None) -> None:
    """Install only the NOTIFY trigger on an existing Bifrost database (idempotent)."""
    url = runtime.required(runtime.load_settings(database_url=database_url).database_url, "database_url")
    runtime.run(_install_trigger(url))
    click.echo(f"NOTIFY trigger installed on workspace_files at {errors.redact_url(url)}")


async def _install_trigger(url: str) -> None:
    engine = db.make_engine(url, pool_size=1)
    try:
        await db.install_trigger(engine)
    finally:
        await engine.dispose()


# -- sync --------------------------------------------------------------------------------------------------------


@click.command("sync", short_help="Converge the cache to PostgreSQL, once or continuously.")
@click.option("--once", "mode", flag_value="once", help="One full resync, then exit.")
@click.option("--watch", "mode", flag_value="watch", help="Keep the cache converged until SIGINT/SIGTERM.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON (--once).")
@click.option("--dry-run", is_flag=True, help="Plan only; write nothing (--once).")
@click.option("--deep", is_flag=True, help="Also SCAN Redis for content keys nobody indexed (--once).")
@click.option("--limit", type=click.IntRange(min=0), default=render.DEFAULT_ITEM_LIMIT, help="Plan items to print.")
@click.option("--listen-database-url", metavar="URL", help="Direct URL for LISTEN [env MODCACHE_LISTEN_DATABASE_URL].")
@runtime.service_options
def sync(
    mode: str | None,
    as_json: bool,
    dry_run: bool,
    deep: bool,
    limit: int,
    listen_database_url: str | None,
    **flags: Any,
) -> None:
    """Converge the Redis module cache to PostgreSQL: once, or continuously."""
    if mode is None:
        raise click.UsageError("give --once or --watch")
    if mode == "watch" and (as_json or dry_run or deep):
        raise click.UsageError("--json, --dry-run and --deep go with --once")
    config = runtime.load_settings(listen_database_url=listen_database_url, **flags)
    if mode == "watch":
        runtime.run(watch.watch(config))
        return
    report = _sync_once(config, dry_run=dry_run, deep=deep, show_progress=not as_json and sys.stdout.isatty())
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
    else:
        _echo_lines(render.report_lines(report, limit=limit))


def _sync_once(config: settings.Settings, *, dry_run: bool, deep: bool, show_progress: bool) -> plan.Report:
    bar = render.ProgressBar(sys.stdout) if show_progress else None
    try:
        return runtime.run(_full_resync(config, dry_run=dry_run, deep=deep, progress=bar))
    finally:
        if bar is not None:
            bar.close()


async def _full_resync(
    config: settings.Settings, *, dry_run: bool, deep: bool, progress: render.ProgressBar | None
) -> plan.Report:
    async with runtime.wired(config) as wired:
        return await wired.engine.full_resync(dry_run=dry_run, deep=deep, progress=progress)


# -- modules -----------------------------------------------------------------------------------------------------


@click.group("modules", short_help="Write and list the source of truth (workspace_files).")
def modules_group() -> None:
    """Write and list the source of truth (workspace_files), validated like a sync validates."""


@modules_group.command("put")
@click.argument("path")
@click.argument("file", type=click.File("rb"))
@runtime.service_options
def modules_put(path: str, file: BinaryIO, **flags: Any) -> None:
    """Create or update module PATH from FILE ('-' for stdin)."""
    config = runtime.load_settings(**flags)
    changed = runtime.run(_put(config, path, file.read()))
    click.echo(f"{'wrote' if changed else 'unchanged'} {path}")


async def _put(config: settings.Settings, path: str, raw: bytes) -> bool:
    async with runtime.source_only(config) as source:
        return await source.put_module(path, raw)


@modules_group.command("rm")
@click.argument("path")
@click.option("--hard", is_flag=True, help="Delete the row instead of soft-deleting it (is_deleted).")
@runtime.service_options
def modules_rm(path: str, hard: bool, **flags: Any) -> None:
    """Remove module PATH (soft delete, Bifrost's way, unless --hard)."""
    config = runtime.load_settings(**flags)
    if not runtime.run(_remove(config, path, hard=hard)):
        click.echo(f"modcache: no live module at {path!r}", err=True)
        sys.exit(EXIT_FAILED)
    click.echo(f"{'deleted' if hard else 'soft-deleted'} {path}")


async def _remove(config: settings.Settings, path: str, *, hard: bool) -> bool:
    async with runtime.source_only(config) as source:
        return await source.remove_module(path, hard=hard)


@modules_group.command("ls")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list.")
@runtime.service_options
def modules_ls(as_json: bool, **flags: Any) -> None:
    """List live modules: path, hash, size."""
    rows = runtime.run(_rows(runtime.load_settings(**flags)))
    if as_json:
        click.echo(json.dumps([{"path": r.path, "hash": r.hash, "size_bytes": r.size_bytes} for r in rows], indent=2))
        return
    for row in rows:
        click.echo(f"{row.hash[:12]}  {row.size_bytes if row.size_bytes is not None else '?':>9}  {row.path}")


async def _rows(config: settings.Settings) -> list[pgsource.ModuleRow]:
    async with runtime.source_only(config) as source:
        return await source.module_rows()


@modules_group.command("load-dir", short_help="Load every *.py file under DIRECTORY.")
@click.argument("directory", type=click.Path(exists=True, file_okay=False, path_type=Path))
@runtime.service_options
def modules_load_dir(directory: Path, **flags: Any) -> None:
    """Load every *.py file under DIRECTORY as a module at its relative path; bad files are reported, not fatal."""
    result = runtime.run(loader.load_dir(runtime.load_settings(**flags), directory))
    _echo_lines(render.load_lines(str(directory), result.changed, result.unchanged, result.rejected))
    if result.rejected:
        sys.exit(EXIT_BAD_INPUT)


# -- status ------------------------------------------------------------------------------------------------------


@click.command("status", short_help="Source vs cache: counts, drift, last sync, generation.")
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
@click.option("--deep", is_flag=True, help="Also SCAN Redis for content keys nobody indexed.")
@runtime.service_options
def status(as_json: bool, deep: bool, **flags: Any) -> None:
    """Source vs cache: counts, drift by reason (a dry-run plan), the last sync, the generation."""
    config = runtime.load_settings(**flags)
    report, record, generation = runtime.run(_status(config, deep=deep))
    if as_json:
        view = {"report": report.to_dict(), "last_sync": record, "generation": generation}
        click.echo(json.dumps(view, indent=2))
        return
    _echo_lines(render.status_lines(report, record=record, generation=generation, prefix=config.key_prefix, now=_now()))


async def _status(config: settings.Settings, *, deep: bool) -> tuple[plan.Report, dict[str, str], int]:
    async with runtime.wired(config) as wired:
        report = await wired.engine.full_resync(dry_run=True, deep=deep)
        return report, await wired.cache.read_status(), await wired.cache.generation()


# -- demo --------------------------------------------------------------------------------------------------------


@click.command("demo", short_help="The main job, end to end, on embedded servers by default.")
@click.option("--exit-after-demo", is_flag=True, help="Exit 0 once the repair has been shown (for CI).")
@runtime.state_dir_option
@runtime.service_options
def demo(exit_after_demo: bool, state_dir: Path | None, **flags: Any) -> None:
    """The main job: embedded PostgreSQL + Redis unless URLs are set, an example workspace, watch mode, and a
    partial expiry repaired live."""
    config = runtime.load_settings(state_dir=state_dir, **flags)
    demo_module.main(config, exit_after_demo=exit_after_demo)
