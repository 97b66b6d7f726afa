"""The consumer's settings: the core's (database, Redis, key prefix) plus broker, pool, session and config cache.

Every field reads ``MODCACHE_<FIELD>`` (``MODCACHE_AMQP_URL``, ``MODCACHE_CONSUMER_CONCURRENCY``,
``MODCACHE_EXECUTION_TIMEOUT_S``, ...). ``ConsumerSettings.from_env()`` turns a bad value into a one-line
``ConfigError`` naming the variable and never echoing its value (URLs and keys are secrets).
"""

from __future__ import annotations

import typing
import urllib.parse
from typing import Any

import pydantic
from cryptography import fernet

from modcache import endpoints, errors, keys, settings


class ConsumerSettings(settings.Settings):
    amqp_url: pydantic.SecretStr | None = pydantic.Field(None, description="RabbitMQ the executions arrive on.")
    amqp_reconnect_interval_s: float = pydantic.Field(
        2.0, gt=0, description="Pause between attempts to reconnect to RabbitMQ after the connection dropped."
    )
    queue_name: str = pydantic.Field(
        keys.EXECUTIONS_QUEUE, min_length=1, max_length=200, description="Durable queue; DLX and poison derive."
    )
    consumer_concurrency: int = pydantic.Field(
        10, gt=0, le=1000, description="Executions in flight at once; also the AMQP prefetch."
    )
    event_loop: typing.Literal["uvloop", "asyncio"] = pydantic.Field(
        "uvloop", description="The consumer's event loop: uvloop (cheaper per execution) or asyncio's own."
    )
    executor_socket: str | None = pydantic.Field(
        None, description="The executor's Unix socket (its own container); unset: the consumer starts it as a child."
    )
    executor_allow_shared_uid: bool = pydantic.Field(
        False,
        description="UNSAFE for more than one tenant: allow executions to run as one shared uid (no namespaces) or as "
        "the consumer's own uid (a non-root consumer starting its executor).",
    )
    execution_network: typing.Literal["none", "host"] = pydantic.Field(
        "none",
        description="none: each execution has an empty network namespace (only a down loopback); host: executions "
        "share the executor's network (workflows that call APIs; every unauthenticated service on it is reachable).",
    )
    worker_memory_limit_bytes: int | None = pydantic.Field(
        1024**3, ge=64 * 1024**2, description="Address-space limit of each execution (RLIMIT_AS); unset: none."
    )
    worker_start_timeout_s: float = pydantic.Field(30.0, gt=0, description="The executor must say hello within this.")
    execution_max_processes: int | None = pydantic.Field(
        64, gt=0, description="Processes an execution's uid may run at once (RLIMIT_NPROC, under root only)."
    )
    execution_max_file_bytes: int | None = pydantic.Field(
        64 * 1024**2, gt=0, description="Largest file an execution may write (RLIMIT_FSIZE)."
    )
    execution_tmp_bytes: int = pydantic.Field(
        64 * 1024**2, gt=0, description="Size of each execution's private /tmp (a tmpfs gone with it)."
    )
    execution_uid_base: int | None = pydantic.Field(
        None,
        gt=0,
        description="Under root, executions run as this uid + a slot (one per running execution); unset: the "
        "executor claims a free range of 4096 uids from 200704 on, locked under /run/modcache/uids, so no two "
        "executors on a host share one. A base another executor holds is a start-up error.",
    )
    max_output_bytes: int = pydantic.Field(
        1024**2, ge=0, description="Output (print) of one execution logged at most; the rest is discarded."
    )
    execution_timeout_s: float = pydantic.Field(
        1800.0, gt=0, description="Upper bound on any execution; a workflow's own timeout_seconds may be lower."
    )
    terminate_grace_s: float = pydantic.Field(
        5.0, ge=0, description="After a timeout: SIGTERM, then SIGKILL if still alive after this."
    )
    max_result_bytes: int = pydantic.Field(1024**2, gt=0, description="Larger results fail the execution.")
    drain_grace_s: float = pydantic.Field(30.0, ge=0, description="On stop, in-flight executions get this long.")
    lease_ttl_s: float = pydantic.Field(
        30.0,
        gt=0,
        le=86400,
        description="A claimed execution's lease lasts this long past its last renewal (crash bound).",
    )
    lease_renew_interval_s: float = pydantic.Field(
        10.0, gt=0, description="The owner renews all its leases this often; must be well below the TTL."
    )
    lease_sweep_interval_s: float = pydantic.Field(
        10.0, gt=0, description="Every consumer looks for expired leases this often (recovery within this)."
    )
    amqp_heartbeat_s: int = pydantic.Field(
        10,
        ge=0,
        le=600,
        description="AMQP heartbeat (unless the URL sets one): the broker sees a frozen or cut-off consumer as gone "
        "after about twice this, and its unacknowledged messages go to the other replicas. 0 disables it.",
    )
    delivery_hold_s: float = pydantic.Field(
        60.0, gt=0, description="A message waiting this long for a free slot goes back to the queue (requeue)."
    )
    reply_retry_s: float = pydantic.Field(
        20.0, gt=0, description="A reply the broker did not confirm is retried this long, then left to a sweeper."
    )
    max_message_bytes: int = pydantic.Field(
        1024**2, gt=0, le=64 * 1024**2, description="Larger message bodies are poisoned unparsed."
    )
    max_message_depth: int = pydantic.Field(
        32, gt=0, le=200, description="Bodies nesting arrays/objects deeper are poisoned unparsed."
    )
    max_message_number_digits: int = pydantic.Field(
        100, gt=0, le=4000, description="Bodies with a longer number are poisoned unparsed."
    )
    handler_stuck_after_s: float | None = pydantic.Field(
        None,
        gt=0,
        description="A message handler running longer fails /livez, so Kubernetes restarts the consumer; "
        "unset: execution_timeout_s + terminate_grace_s + 300 (the slowest legitimate run plus its bookkeeping).",
    )
    transient_retry_delay_s: float = pydantic.Field(
        2.0, ge=0, description="A message that met a service outage is requeued after this pause."
    )
    db_pool_size: int | None = pydantic.Field(
        None, gt=0, le=1000, description="Pooled PostgreSQL connections; unset: concurrency + 1 (for repairs)."
    )
    db_ping_after_idle_s: float = pydantic.Field(
        30.0, ge=0, description="A pooled connection idle longer than this is pinged on checkout; else no ping."
    )
    db_pool_timeout_s: float = pydantic.Field(10.0, gt=0, description="Wait for a pooled connection at most this.")
    db_command_timeout_s: float = pydantic.Field(
        15.0,
        gt=0,
        description="A statement that takes longer (a partitioned database, a lock held elsewhere) fails as an outage: "
        "its message goes back to the queue for a replica that can reach PostgreSQL.",
    )
    config_cache_ttl_s: int = pydantic.Field(60, gt=0, description="Organization/config entries live this long.")
    cache_namespace: str = pydantic.Field("", max_length=200, description="Prefix of org/config cache keys.")
    secrets_key: pydantic.SecretStr | None = pydantic.Field(
        None, description="Fernet key(s), comma-separated, newest first; encrypts secret configs at rest."
    )
    health_host: str = pydantic.Field("0.0.0.0", description="Where /livez (/healthz), /readyz, /metrics listen.")
    health_port: int | None = pydantic.Field(8080, ge=0, le=65535, description="0: any free port; unset: off.")
    metrics_port: int | None = pydantic.Field(
        None, ge=0, le=65535, description="A separate /metrics listener; unset: /metrics on the health port."
    )

    @pydantic.field_validator("amqp_url")
    @classmethod
    def _amqp_scheme(cls, value: pydantic.SecretStr | None) -> pydantic.SecretStr | None:
        if value is not None:
            parsed = urllib.parse.urlsplit(value.get_secret_value())
            if parsed.scheme not in ("amqp", "amqps"):
                raise ValueError("URL scheme must be one of amqp, amqps")
        return value

    @pydantic.field_validator("secrets_key")
    @classmethod
    def _fernet_keys(cls, value: pydantic.SecretStr | None) -> pydantic.SecretStr | None:
        if value is not None:
            for key in value.get_secret_value().split(","):
                try:
                    fernet.Fernet(key.strip())
                except ValueError:
                    raise ValueError("not a Fernet key (32 url-safe base64-encoded bytes)") from None
        return value

    @pydantic.field_validator("lease_renew_interval_s")
    @classmethod
    def _renew_in_time(cls, value: float, info: pydantic.ValidationInfo) -> float:
        if value * 2 > info.data.get("lease_ttl_s", value * 2):
            raise ValueError("must be at most half of MODCACHE_LEASE_TTL_S (a renewal may be late once)")
        return value

    @pydantic.model_validator(mode="after")
    def _config_keys_in_one_slot(self) -> ConsumerSettings:
        """On a Redis Cluster the config cache reads several keys in one MGET: they need one hash tag too."""
        endpoint = self.redis_endpoint()
        cluster = endpoint is not None and endpoint.topology is endpoints.Topology.CLUSTER
        if cluster and keys.hash_tag(self.cache_namespace) is None:
            raise errors.ConfigError(
                f"{settings.ENV_PREFIX}CACHE_NAMESPACE",
                "a Redis Cluster URL needs a hash tag in the config cache namespace too, so that one lookup's"
                " keys share a slot: for example '{bifrost-config}:'",
            )
        return self

    @classmethod
    def from_env(cls, **overrides: Any) -> ConsumerSettings:
        given = {k: v for k, v in overrides.items() if v is not None}
        try:
            return cls(**given)
        except pydantic.ValidationError as e:
            raise settings.config_error(e) from None

    # -- derived values --------------------------------------------------------------------------------------

    @property
    def pool_size(self) -> int:
        return self.db_pool_size or self.consumer_concurrency + 1

    @property
    def handler_bound_s(self) -> float:
        """How long a message handler may run before /livez calls the consumer wedged."""
        if self.handler_stuck_after_s is not None:
            return self.handler_stuck_after_s
        return self.execution_timeout_s + self.terminate_grace_s + 300.0

    def encryption_keys(self) -> list[str]:
        if self.secrets_key is None:
            return []
        return [k.strip() for k in self.secrets_key.get_secret_value().split(",")]

    def required(self, name: str) -> str:
        """The secret URL ``name`` (``database_url``, ``redis_url``, ``amqp_url``), or a ConfigError naming it."""
        value = getattr(self, name)
        if value is None:
            variable = f"{settings.ENV_PREFIX}{name.upper()}"
            raise errors.ConfigError(variable, f"required by the consumer (or {variable}{settings.FILE_SUFFIX})")
        secret: str = value.get_secret_value()
        return secret
