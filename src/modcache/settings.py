"""Settings for the engine and the watcher: grouped, typed, units in their names, one constructor.

``Settings.from_env()`` reads ``MODCACHE_*`` variables (and keyword overrides from flags); a bad value becomes a
one-line ``ConfigError`` naming the variable, never echoing its value (URLs hold passwords).

Every secret setting (a ``SecretStr`` field: the database, LISTEN and Redis URLs here; the AMQP URL and the
secrets key in the consumer's subclass) can instead be read from the file named by ``MODCACHE_<NAME>_FILE``,
the Kubernetes Secret-volume convention: the secret then never sits in the process environment, which
``/proc/<pid>/environ`` exposes to anything that can read it. Setting both variables is an error; a file that
cannot be read, is empty, is not UTF-8 or is larger than ``MAX_SECRET_FILE_BYTES`` is a ``ConfigError`` naming
the ``_FILE`` variable, never the content.
"""

from __future__ import annotations

import os
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import pydantic
import pydantic_settings

from modcache import endpoints, errors, keys, modules

ENV_PREFIX = "MODCACHE_"
FILE_SUFFIX = "_FILE"
MAX_SECRET_FILE_BYTES = 64 * 1024  # a URL or a few keys; also stops a path like /dev/zero from hanging start-up


class Settings(pydantic_settings.BaseSettings):
    model_config = pydantic_settings.SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", frozen=True)

    database_url: pydantic.SecretStr | None = pydantic.Field(
        None, description="PostgreSQL holding workspace_files; unset: embedded server (CLI demo only)."
    )
    listen_database_url: pydantic.SecretStr | None = pydantic.Field(
        None, description="Direct PostgreSQL URL for LISTEN when database_url goes through PgBouncer."
    )
    redis_url: pydantic.SecretStr | None = pydantic.Field(
        None,
        description="Redis holding the module cache (redis[s]://, redis[s]+sentinel://, redis[s]+cluster://, "
        "unix://; see docs/topologies.md); unset: embedded server (CLI demo only).",
    )
    redis_ssl_ca_file: Path | None = pydantic.Field(
        None, description="PEM bundle of the CAs that sign the Redis servers' certificates; unset: system CAs."
    )
    redis_ssl_cert_file: Path | None = pydantic.Field(
        None, description="PEM client certificate, for servers that require one (tls-auth-clients yes)."
    )
    redis_ssl_key_file: Path | None = pydantic.Field(None, description="PEM private key of redis_ssl_cert_file.")
    redis_ssl_cert_reqs: Literal["required", "optional", "none"] = pydantic.Field(
        "required", description="Whether the server's certificate must verify; 'none' only for tests."
    )
    redis_ssl_check_hostname: bool = pydantic.Field(
        True, description="Whether the server's certificate must name the host connected to."
    )
    redis_sentinel_password: pydantic.SecretStr | None = pydantic.Field(
        None, description="Password of the sentinels themselves (requirepass); the URL's is the data nodes'."
    )
    redis_connect_timeout_s: float = pydantic.Field(
        5.0, gt=0, description="A Redis connection must be made within this (a failed-over master may not answer)."
    )
    redis_socket_timeout_s: float = pydantic.Field(
        10.0,
        gt=0,
        description="A Redis reply must come within this (a stopped master otherwise hangs the sync); longer than "
        "the biggest script call.",
    )
    database_ssl_mode: Literal["disable", "allow", "prefer", "require", "verify-ca", "verify-full"] | None = (
        pydantic.Field(None, description="libpq sslmode added to the PostgreSQL URLs unless they set it.")
    )
    database_ssl_root_cert_file: Path | None = pydantic.Field(
        None, description="PEM CA bundle for sslmode verify-ca/verify-full (libpq sslrootcert)."
    )
    database_ssl_cert_file: Path | None = pydantic.Field(None, description="PEM client certificate (sslcert).")
    database_ssl_key_file: Path | None = pydantic.Field(None, description="PEM key of database_ssl_cert_file.")
    key_prefix: str = pydantic.Field(keys.DEFAULT_PREFIX, min_length=1, description="Bifrost's layout prefix.")
    resync_interval_s: float = pydantic.Field(300.0, gt=0, description="Full diff period; NOTIFY covers the rest.")
    resync_jitter_ratio: float = pydantic.Field(0.1, ge=0, le=1, description="Spreads resyncs of many caches.")
    deep_interval_s: float = pydantic.Field(
        3600.0, gt=0, description="Period of the whole-value check (and SCAN) in watch mode; events cover the rest."
    )
    probe_interval_s: float = pydantic.Field(
        0.1, gt=0, description="How often watch mode probes for a flush, restart or lossy failover (no events)."
    )
    excluded_prefixes: tuple[str, ...] = pydantic.Field(
        (), description="Longer prefixes of other caches in the same Redis DB: their keys are never touched."
    )
    ttl_s: int | None = pydantic.Field(None, gt=0, description="Content key TTL; None keeps keys forever.")
    ttl_jitter_ratio: float = pydantic.Field(
        0.2, ge=0, le=1, description="Per-key TTL spread so keys never expire together."
    )
    max_module_bytes: int = pydantic.Field(
        modules.DEFAULT_MAX_MODULE_BYTES, gt=0, description="Larger modules are rejected, not cached."
    )
    fetch_batch_size: int = pydantic.Field(
        1000, gt=0, description="Modules whose content is read and written per batch."
    )
    check_batch_size: int = pydantic.Field(5000, gt=0, description="Content keys verified per Redis script call.")
    listener_backoff_max_s: float = pydantic.Field(30.0, gt=0, description="Cap of the LISTEN reconnect backoff.")
    listener_keepalive_s: float = pydantic.Field(15.0, gt=0, description="Idle time before the listener pings.")
    state_dir: Path = pydantic.Field(
        Path.home() / ".local" / "state" / "modcache", description="Where embedded servers keep their data."
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[pydantic_settings.BaseSettings],
        init_settings: pydantic_settings.PydanticBaseSettingsSource,
        env_settings: pydantic_settings.PydanticBaseSettingsSource,
        dotenv_settings: pydantic_settings.PydanticBaseSettingsSource,
        file_secret_settings: pydantic_settings.PydanticBaseSettingsSource,
    ) -> tuple[pydantic_settings.PydanticBaseSettingsSource, ...]:
        return init_settings, env_settings, SecretFiles(settings_cls), dotenv_settings, file_secret_settings

    @pydantic.field_validator("database_url", "listen_database_url")
    @classmethod
    def _postgres_scheme(cls, value: pydantic.SecretStr | None) -> pydantic.SecretStr | None:
        if value is not None:
            endpoints.check_postgres(value.get_secret_value())  # one host or several (libpq's multi-host form)
        return value

    @pydantic.field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, value: pydantic.SecretStr | None) -> pydantic.SecretStr | None:
        if value is not None:
            endpoints.parse_redis(value.get_secret_value())
        return value

    @pydantic.model_validator(mode="after")
    def _topology_fits(self) -> Settings:
        endpoint = self.redis_endpoint()
        if endpoint is None:
            return self
        if endpoint.topology is endpoints.Topology.CLUSTER and keys.hash_tag(self.key_prefix) is None:
            raise errors.ConfigError(
                f"{ENV_PREFIX}KEY_PREFIX",
                "a Redis Cluster URL needs a hash tag in the key prefix, so that every key of the cache lives in one"
                " slot and the write scripts stay atomic: for example '{bifrost}:module:' instead of"
                " 'bifrost:module:'",
            )
        tls_files = ("redis_ssl_ca_file", "redis_ssl_cert_file", "redis_ssl_key_file")
        given = [name for name in tls_files if getattr(self, name) is not None]
        if given and not endpoint.tls:
            raise errors.ConfigError(
                f"{ENV_PREFIX}{given[0].upper()}", "set, but MODCACHE_REDIS_URL does not use TLS (rediss://...)"
            )
        if (self.redis_ssl_cert_file is None) != (self.redis_ssl_key_file is None):
            raise errors.ConfigError(
                f"{ENV_PREFIX}REDIS_SSL_KEY_FILE", "the client certificate and its key are set together"
            )
        return self

    @pydantic.model_validator(mode="after")
    def _tls_not_relaxed_by_urls(self) -> Settings:
        """A URL parameter that weakens what the ``*_SSL_*`` settings ask for is a contradiction: refused, naming
        both (a URL parameter wins over the settings, so it would weaken them silently)."""
        for contradicts, variable, reason in self._tls_relaxations():
            if contradicts:
                raise errors.ConfigError(variable, reason)
        return self

    def tls_relaxed_by_url(self) -> list[str]:
        """What the URLs alone weaken, with no TLS setting to contradict (``wiring`` logs each once)."""
        return [f"{variable}: {reason}" for contradicts, variable, reason in self._tls_relaxations() if not contradicts]

    def _tls_relaxations(self) -> list[tuple[bool, str, str]]:
        found = self._redis_relaxations()
        for field in ("database_url", "listen_database_url"):
            found += self._postgres_relaxations(field)
        return found

    def _redis_relaxations(self) -> list[tuple[bool, str, str]]:
        endpoint = self.redis_endpoint()
        if endpoint is None or not endpoint.tls or endpoint.topology is not endpoints.Topology.SINGLE:
            return []  # a Sentinel or Cluster URL's query is refused (endpoints); redis:// has no TLS to weaken
        configured = [f for f in sorted(self.model_fields_set) if f.startswith("redis_ssl_")]
        variable = f"{ENV_PREFIX}REDIS_URL"
        found = []
        unverified = self.redis_ssl_cert_reqs == "none"
        agreed = {f"ssl_cert_reqs={self.redis_ssl_cert_reqs}"}  # the URL says what the settings say: no conflict
        agreed |= {"ssl_check_hostname=false"} if unverified or not self.redis_ssl_check_hostname else set()
        for parameter, effect in endpoints.redis_tls_relaxations(endpoint.url):
            if parameter in agreed and configured:
                continue
            if configured:
                setting = f"{ENV_PREFIX}{configured[0].upper()}"
                reason = f"?{parameter} in the URL overrides {setting} ({effect}): drop the parameter or the setting"
                found.append((True, variable, reason))
            else:
                found.append((False, variable, f"?{parameter} in the URL: {effect}"))
        return found

    def _postgres_relaxations(self, field: str) -> list[tuple[bool, str, str]]:
        value = getattr(self, field)
        if value is None:
            return []
        query = endpoints.url_query(value.get_secret_value())
        variable = f"{ENV_PREFIX}{field.upper()}"
        configured = [f for f in sorted(self.model_fields_set) if f.startswith("database_ssl_") and getattr(self, f)]
        found = []
        try:
            mode = None if "sslmode" not in query else endpoints.sslmode(query["sslmode"])
        except ValueError as e:
            return [(True, variable, f"{e}: spell it as libpq does")]
        if mode is not None:
            wanted = self.database_ssl_mode  # set explicitly; TLS files alone refuse the plaintext modes below
            if wanted is not None and endpoints.SSL_MODES.index(mode) < endpoints.SSL_MODES.index(wanted):
                reason = f"sslmode={mode} in the URL is weaker than {ENV_PREFIX}DATABASE_SSL_MODE={wanted}"
                found.append((True, variable, f"{reason}: drop the parameter or the setting"))
            elif mode in endpoints.PLAINTEXT_SSL_MODES and configured:
                reason = f"sslmode={mode} in the URL relaxes the TLS {ENV_PREFIX}{configured[0].upper()} configures"
                found.append((True, variable, f"{reason}: drop the parameter, or set sslmode=verify-full"))
            elif mode in endpoints.PLAINTEXT_SSL_MODES:
                found.append((False, variable, f"sslmode={mode} in the URL: the connection may be unencrypted"))
        files = (("sslrootcert", "root_cert_file"), ("sslcert", "cert_file"), ("sslkey", "key_file"))
        for parameter, suffix in files:
            setting = getattr(self, f"database_ssl_{suffix}")
            if parameter in query and setting is not None and query[parameter] != str(setting):
                reason = f"{parameter} in the URL and {ENV_PREFIX}DATABASE_SSL_{suffix.upper()} differ: set only one"
                found.append((True, variable, reason))
        return found

    @classmethod
    def from_env(cls, **overrides: Any) -> Settings:
        """Settings from the environment, with non-None ``overrides`` (CLI flags) taking precedence."""
        given = {k: v for k, v in overrides.items() if v is not None}
        try:
            return cls(**given)
        except pydantic.ValidationError as e:
            raise config_error(e) from None

    def keyspace(self) -> keys.KeySpace:
        return keys.KeySpace(self.key_prefix, excluded=self.excluded_prefixes)

    def redis_endpoint(self) -> endpoints.RedisEndpoint | None:
        return None if self.redis_url is None else endpoints.parse_redis(self.redis_url.get_secret_value())

    def effective_database_ssl_mode(self) -> str | None:
        """``database_ssl_mode``, or ``verify-full`` when it is unset but a TLS file is set (a CA bundle or a client
        certificate says TLS is wanted: asyncpg's own default would be ``prefer``, or ``PGSSLMODE``, and a server
        without TLS would be talked to in plaintext, attack-11c U5); None: nothing configured (asyncpg decides)."""
        if self.database_ssl_mode is not None:
            return self.database_ssl_mode
        files = (self.database_ssl_root_cert_file, self.database_ssl_cert_file, self.database_ssl_key_file)
        return "verify-full" if any(f is not None for f in files) else None

    def database_ssl_params(self) -> dict[str, str]:
        """The libpq TLS parameters these settings add to every PostgreSQL URL (the URL's own win)."""
        params = {
            "sslmode": self.effective_database_ssl_mode(),
            "sslrootcert": self.database_ssl_root_cert_file,
            "sslcert": self.database_ssl_cert_file,
            "sslkey": self.database_ssl_key_file,
        }
        return {name: str(value) for name, value in params.items() if value is not None}

    def listen_url(self) -> str | None:
        """The direct URL for LISTEN: ``listen_database_url`` (behind PgBouncer), else ``database_url``."""
        chosen = self.listen_database_url or self.database_url
        return None if chosen is None else chosen.get_secret_value()


class SecretFiles(pydantic_settings.PydanticBaseSettingsSource):
    """The secret settings named by ``MODCACHE_<NAME>_FILE``, read from those files."""

    def __init__(
        self, settings_cls: type[pydantic_settings.BaseSettings], *, environ: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(settings_cls)
        self._environ = os.environ if environ is None else environ

    def get_field_value(self, field: pydantic.fields.FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False  # unused: __call__ reads every secret field at once

    def __call__(self) -> dict[str, Any]:
        values: dict[str, Any] = {}
        for name in secret_fields(self.settings_cls):
            variable = f"{ENV_PREFIX}{name.upper()}"
            path = self._environ.get(variable + FILE_SUFFIX)
            if not path:
                continue
            if self._environ.get(variable):
                raise errors.ConfigError(variable + FILE_SUFFIX, f"{variable} is set too; set only one of them")
            values[name] = read_secret_file(variable + FILE_SUFFIX, Path(path))
        return values


def secret_fields(settings_cls: type[pydantic.BaseModel]) -> list[str]:
    """The fields holding secrets: those typed ``SecretStr`` (optional or not)."""
    return [
        name
        for name, field in settings_cls.model_fields.items()
        if field.annotation is pydantic.SecretStr or pydantic.SecretStr in typing.get_args(field.annotation)
    ]


def read_secret_file(variable: str, path: Path) -> str:
    """The secret in ``path`` without surrounding whitespace (``echo`` adds a newline), or a ConfigError naming
    ``variable`` and saying what is wrong, never what the file holds."""
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_SECRET_FILE_BYTES + 1)
    except OSError as e:
        raise errors.ConfigError(variable, f"cannot read the file ({e.strerror or type(e).__name__})") from None
    if len(raw) > MAX_SECRET_FILE_BYTES:
        raise errors.ConfigError(variable, f"the file is larger than {MAX_SECRET_FILE_BYTES} bytes")
    try:
        text = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise errors.ConfigError(variable, "the file is not UTF-8 text") from None
    if not text:
        raise errors.ConfigError(variable, "the file is empty")
    return text


def config_error(
    e: pydantic.ValidationError, env_prefix: str = ENV_PREFIX, *, environ: Mapping[str, str] | None = None
) -> errors.ConfigError:
    """The first validation problem as a ConfigError naming the variable (``..._FILE`` when the value came
    from a file), without the offending value."""
    first = e.errors(include_input=False, include_url=False)[0]
    name = "_".join(str(part) for part in first["loc"]) or "settings"
    reason = str(first["msg"]).removeprefix("Value error, ")
    variable = f"{env_prefix}{name.upper()}"
    environ = os.environ if environ is None else environ
    if env_prefix and environ.get(variable + FILE_SUFFIX) and not environ.get(variable):
        variable += FILE_SUFFIX
    return errors.ConfigError(variable, reason)


def asyncpg_dsn(url: str) -> str:
    """A SQLAlchemy-style PostgreSQL URL as a plain libpq/asyncpg DSN."""
    scheme, rest = url.split("://", 1)
    return f"postgresql://{rest}" if scheme.startswith("postgres") else url


def sqlalchemy_url(url: str) -> str:
    """A PostgreSQL URL with the asyncpg driver SQLAlchemy needs."""
    scheme, rest = url.split("://", 1)
    return f"postgresql+asyncpg://{rest}" if scheme in ("postgresql", "postgres") else url
