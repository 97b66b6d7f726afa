"""Wiring for the core CLI commands: settings from the environment and flags, then adapters and the engine.

Flags override ``MODCACHE_*`` variables (``Settings.from_env(**flags)``). A bad value is reported as one line
naming the flag or variable it came from, never its value. URLs are better passed in the environment: a flag is
visible to every user of the machine in the process list.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping
from pathlib import Path
from typing import Any, TypeVar

import click
import pydantic

from modcache import errors, pgsource, settings, wiring

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])

#: Flags every command that touches the services accepts; each maps to the Settings field of the same name.
SERVICE_FLAGS = ("database_url", "redis_url", "key_prefix", "max_module_bytes")


def service_options(command: F) -> F:
    """Add ``--database-url``, ``--redis-url``, ``--key-prefix``, ``--max-module-bytes`` to a command."""
    options = [
        click.option("--database-url", metavar="URL", help="PostgreSQL URL [env MODCACHE_DATABASE_URL]."),
        click.option("--redis-url", metavar="URL", help="Redis URL [env MODCACHE_REDIS_URL]."),
        click.option("--key-prefix", metavar="PREFIX", help="Cache key prefix [env MODCACHE_KEY_PREFIX]."),
        click.option(
            "--max-module-bytes", type=int, metavar="N", help="Module size limit [env MODCACHE_MAX_MODULE_BYTES]."
        ),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def flag_name(variable: str) -> str:
    """``MODCACHE_DATABASE_URL`` -> ``--database-url``."""
    return "--" + variable.removeprefix(settings.ENV_PREFIX).lower().replace("_", "-")


def load_settings(**flags: Any) -> settings.Settings:
    """Settings from the environment with ``flags`` (None = not given) on top; errors name the flag if given."""
    try:
        return settings.Settings.from_env(**flags)
    except errors.ConfigError as e:
        field = e.setting.removeprefix(settings.ENV_PREFIX).lower()
        if flags.get(field) is not None:
            raise errors.ConfigError(f"{flag_name(e.setting)} ({e.setting})", e.reason) from None
        raise


def required(value: pydantic.SecretStr | None, field: str) -> str:
    """The secret value of a URL setting, or a ConfigError saying how to provide it."""
    if value is None:
        variable = f"{settings.ENV_PREFIX}{field.upper()}"
        raise errors.ConfigError(variable, f"not set (set it or pass {flag_name(variable)})")
    return value.get_secret_value()


def with_urls(base: settings.Settings, urls: Mapping[str, str]) -> settings.Settings:
    """``base`` pointing at the given services (``postgres``/``redis``: the demo's embedded servers)."""
    fields = {"postgres": "database_url", "redis": "redis_url"}
    return base.model_copy(update={fields[name]: pydantic.SecretStr(url) for name, url in urls.items()})


@contextlib.asynccontextmanager
async def source_only(config: settings.Settings) -> AsyncIterator[pgsource.PgSource]:
    required(config.database_url, "database_url")
    source = wiring.make_source(config)
    try:
        yield source
    finally:
        await source.close()


def wired(config: settings.Settings) -> contextlib.AbstractAsyncContextManager[wiring.Wired]:
    """Source, cache and engine for ``config`` (``wiring.connect``); both URLs are required."""
    required(config.redis_url, "redis_url")
    required(config.database_url, "database_url")
    return wiring.connect(config)


def run(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run a command's coroutine to completion."""
    return asyncio.run(coroutine)


def state_dir_option(command: F) -> F:
    return click.option(
        "--state-dir",
        type=click.Path(file_okay=False, path_type=Path),
        help="Where embedded servers keep their data [env MODCACHE_STATE_DIR].",
    )(command)
