"""The command line imports what a command needs when it runs, nothing more.

``modcache --help`` must not import any command's module (it lists them from ``main.COMMANDS``), and the core
commands (``status``, ``sync --once``, ``modules ...``) must never load kopf or kubernetes-asyncio: each of these
runs as a real process that reports, when it exits, which of the heavy packages it had imported.
"""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import click
import pytest

from modcache import keys
from modcache.cli import main
from testkit import cli

HEAVY = ("kopf", "kubernetes_asyncio", "aiohttp", "sqlalchemy", "asyncpg", "redis", "aio_pika", "pydantic")
OPERATOR_ONLY = {"kopf", "kubernetes_asyncio"}

# Runs ``modcache ARGS`` through the real entry point and, at exit, writes the heavy packages it imported.
PROBE = """
import atexit, json, sys
heavy = {heavy!r}
report = sys.argv.pop(1)
atexit.register(lambda: open(report, "w").write(json.dumps(sorted(h for h in heavy if h in sys.modules))))
sys.argv[0] = "modcache"
from modcache.cli.main import main
main()
"""


def loaded_by(args: list[str], report: Path, env: dict[str, str] | None = None) -> set[str]:
    """The heavy packages ``modcache ARGS`` had imported when it exited (with whatever exit code)."""
    code = PROBE.format(heavy=HEAVY)
    done = subprocess.run(
        [sys.executable, "-c", code, str(report), *args],
        env=cli.clean_environ(env or {}),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert report.exists(), done.stderr
    return set(json.loads(report.read_text()))


def test_help_imports_no_command_module(tmp_path: Path) -> None:
    assert loaded_by(["--help"], tmp_path / "report") == set()


def test_the_help_lists_every_command(tmp_path: Path) -> None:
    shown = subprocess.run(
        [cli.console_script(), "--help"], env=cli.clean_environ({}), capture_output=True, text=True, check=True
    ).stdout
    for name, entry in main.COMMANDS.items():
        assert f"  {name} " in shown
        assert entry.short_help in shown


@pytest.mark.parametrize(
    "args",
    [["status"], ["sync", "--once"], ["modules", "ls"], ["modules", "rm", "nothing/here.py"], ["sync", "--help"]],
    ids=" ".join,
)
def test_core_commands_never_load_the_operator_stack(
    args: list[str], tmp_path: Path, database_url: str, redis_url: str, keyspace: keys.KeySpace
) -> None:
    loaded = loaded_by(args, tmp_path / "report", cli.service_env(database_url, redis_url, keyspace))
    assert not loaded & OPERATOR_ONLY, loaded
    if args[-1] != "--help":
        assert "sqlalchemy" in loaded  # the probe sees real imports: the command did reach PostgreSQL


def top_level_commands(module_name: str) -> dict[str, click.Command]:
    """The commands a module defines that are not a subcommand of one of its groups."""
    module = importlib.import_module(module_name)
    found = [v for v in vars(module).values() if isinstance(v, click.Command)]
    children = {id(c) for g in found if isinstance(g, click.Group) for c in g.commands.values()}
    return {c.name or "": c for c in found if id(c) not in children}


def test_the_registry_names_exactly_the_commands_the_areas_define() -> None:
    modules = {entry.module for entry in main.COMMANDS.values()}
    defined = {name: cmd for m in sorted(modules) for name, cmd in top_level_commands(m).items()}
    assert set(defined) == set(main.COMMANDS)
    context = click.Context(main.cli, info_name="modcache")
    for name, command in defined.items():
        assert main.cli.get_command(context, name) is command
