"""``modcache``: one click group; each area contributes its commands from a module of its own, loaded lazily.

* core (``modcache.cli.core``): ``db``, ``sync``, ``modules``, ``status``, ``demo``;
* ``modcache_operator.cli``: ``operator``;
* ``modcache_consumer.cli``: ``consumer``, ``executor``, ``workflows``, ``run``.

A command's module is imported only when that command runs (or its own ``--help`` is shown): ``modcache --help``
lists the commands from ``COMMANDS`` without importing any of them, and ``status`` or ``sync`` never load kopf or
kubernetes-asyncio. ``tests/core/test_cli_imports.py`` holds both, and that ``COMMANDS`` matches the commands.

Exit codes: 0 success, 1 the job failed (service down, sync error), 2 bad usage or a bad setting.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import sys

import click

from modcache import errors

EXIT_FAILED = 1
EXIT_USAGE = 2


@dataclasses.dataclass(frozen=True)
class Entry:
    """Where a command lives, and the one line ``modcache --help`` shows for it."""

    module: str
    attribute: str
    short_help: str


COMMANDS = {
    "consumer": Entry(
        "modcache_consumer.cli",
        "consumer_command",
        "Run workflow executions from RabbitMQ until SIGTERM.",
    ),
    "db": Entry("modcache.cli.core", "db_group", "The source schema: migrations and the NOTIFY trigger."),
    "demo": Entry("modcache.cli.core", "demo", "The main job, end to end, on embedded servers by default."),
    "executor": Entry(
        "modcache_consumer.cli",
        "executor_command",
        "Run workflow code in fresh isolated processes for a consumer.",
    ),
    "modules": Entry("modcache.cli.core", "modules_group", "Write and list the source of truth (workspace_files)."),
    "operator": Entry(
        "modcache_operator.cli",
        "operator",
        "Keep every ModuleCache converged (the kopf operator).",
    ),
    "run": Entry(
        "modcache_consumer.cli",
        "run_command",
        "Publish an execution of a workflow; --wait prints its result.",
    ),
    "status": Entry("modcache.cli.core", "status", "Source vs cache: counts, drift, last sync, generation."),
    "sync": Entry("modcache.cli.core", "sync", "Converge the cache to PostgreSQL, once or continuously."),
    "workflows": Entry("modcache_consumer.cli", "workflows_group", "Workflows the consumer can run."),
}


class LazyGroup(click.Group):
    """A group whose subcommands are imported on first use (click's documented lazy-loading pattern)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        entry = COMMANDS.get(cmd_name)
        if entry is None:
            return None
        command = getattr(importlib.import_module(entry.module), entry.attribute)
        if not isinstance(command, click.Command):
            raise TypeError(f"{entry.module}.{entry.attribute} is not a click command")
        return command

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """The command list from ``COMMANDS``: showing it imports nothing."""
        rows = [(name, COMMANDS[name].short_help) for name in self.list_commands(ctx)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="More logging (-v info, -vv debug).")
@click.version_option(package_name="modcache")
def cli(verbose: int) -> None:
    """Keep a Bifrost-compatible Redis module cache converged to PostgreSQL."""
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def main() -> None:
    """Console entry point: ModcacheErrors become one line on stderr and a clear exit code."""
    try:
        code = cli.main(standalone_mode=False)
        if isinstance(code, int) and code:
            sys.exit(code)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(EXIT_FAILED)
    except click.ClickException as e:
        e.show()
        sys.exit(EXIT_USAGE)
    except errors.ConfigError as e:
        click.echo(f"modcache: bad setting {e}", err=True)
        sys.exit(EXIT_USAGE)
    except errors.InputError as e:
        click.echo(f"modcache: {e}", err=True)
        sys.exit(EXIT_USAGE)
    except errors.ModcacheError as e:
        click.echo(f"modcache: {e}", err=True)
        sys.exit(EXIT_FAILED)
    except SystemExit:
        raise
