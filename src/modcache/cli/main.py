"""``modcache``: one click group; each area contributes its commands from a module of its own.

* core (this package): ``db``, ``sync``, ``modules``, ``status``, ``demo``;
* ``modcache_operator.cli.commands``: ``operator``;
* ``modcache_consumer.cli.commands``: ``consumer``, ``workflows``, ``run``.

Exit codes: 0 success, 1 the job failed (service down, sync error), 2 bad usage or a bad setting.
"""

from __future__ import annotations

import importlib
import logging
import sys

import click

from modcache import errors

EXIT_FAILED = 1
EXIT_USAGE = 2

#: Modules exposing ``commands: list[click.Command]``; a missing one is skipped so areas can land separately.
COMMAND_MODULES = (
    "modcache.cli.core",
    "modcache_operator.cli",
    "modcache_consumer.cli",
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="More logging (-v info, -vv debug).")
@click.version_option(package_name="modcache")
def cli(verbose: int) -> None:
    """Keep a Bifrost-compatible Redis module cache converged to PostgreSQL."""
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _register() -> None:
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name != name:
                raise
            continue
        for command in module.commands:
            cli.add_command(command)


_register()


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
