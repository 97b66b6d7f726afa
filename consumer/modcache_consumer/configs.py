"""Organizations and configs for executions: Redis first (with a TTL), PostgreSQL on a miss.

* ``get_organization(org_id, db=None)`` and ``load_config_for_scope(scope, db=None)`` keep the original plan's
  names; with ``db`` they read through the caller's session, without they open a unit of work of their own.
* Each scope's own rows are cached separately (``GLOBAL`` and one entry per organization) and merged on read:
  organization rows override global ones, and changing a global config invalidates one key, not every org.
* Cache fills happen only after the unit of work that read the rows commits (``database.after_commit``), so a
  rolled-back transaction never leaves its rows in the cache (the inverse of bifrost-contract.md, defect 6).
* ``secret`` configs are Fernet tokens in the database and in the cache; the plaintext exists only when a
  workflow reads the value (``ExecutionContext.get_config`` in the worker). Config values are never logged.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import uuid
from collections.abc import Awaitable, Mapping, Sequence
from typing import Any, TypedDict, TypeVar

import redis.exceptions
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql as pg
from sqlalchemy.ext.asyncio import AsyncSession

from modcache import errors, keys, rediscache, schema
from modcache_consumer import crypto, database

log = logging.getLogger(__name__)

T = TypeVar("T")

GLOBAL = "GLOBAL"
SECRET = "secret"


class RawConfigValue(TypedDict):
    """One config as cached and as handed to a worker: ``value`` is a Fernet token when ``type`` is secret."""

    value: Any
    type: str


ConfigMap = dict[str, RawConfigValue]


@dataclasses.dataclass(frozen=True)
class Organization:
    id: uuid.UUID
    name: str
    domain: str | None
    is_active: bool

    def to_raw(self) -> dict[str, Any]:
        return {"id": str(self.id), "name": self.name, "domain": self.domain, "is_active": self.is_active}


class ConfigResolver:
    def __init__(
        self,
        *,
        database: database.Database,
        client: rediscache.Client,  # one node, a Sentinel-managed master or a Cluster (wiring.make_redis)
        secrets: crypto.Secrets,
        ttl_s: int = 60,
        namespace: str = "",
    ) -> None:
        self._database = database
        self._client = client
        self.secrets = secrets
        self._ttl_s = ttl_s
        self._namespace = namespace

    # -- organizations -------------------------------------------------------------------------------------

    def cache_keys(self, scope: str, organization_id: uuid.UUID | None) -> list[str]:
        """The cache entries ``load_config_for_scope(scope)`` and ``get_organization(organization_id)`` read, for
        a caller that reads them along with other keys (``readiness.CacheGuard.check_with``) and hands their
        values back as ``cached``: the config scopes' entries, then the organization's (if any)."""
        org = None if scope == GLOBAL else _org_uuid(scope)
        scopes = [GLOBAL] if org is None else [GLOBAL, str(org)]
        wanted = [keys.config_cache_key(s, self._namespace) for s in scopes]
        if organization_id is not None:
            wanted.append(keys.org_cache_key(str(organization_id), self._namespace))
        return wanted

    async def get_organization(
        self, org_id: str | uuid.UUID, db: AsyncSession | None = None, *, cached: Any = None
    ) -> Organization | None:
        """The organization (``uuid`` or ``ORG:uuid``), or None if it does not exist or the id is malformed.
        ``cached``: its cache entry as read already (``cache_keys``); None reads it."""
        key = _org_uuid(org_id)
        if key is None:
            log.warning("invalid organization id format")
            return None
        entry = _loads(cached) if cached is not None else await self._get(keys.org_cache_key(str(key), self._namespace))
        known = _organization(entry)
        if known is not None:
            return known
        if db is None:
            return await self._database.run(lambda own: self.get_organization(key, db=own))
        row = await db.get(schema.Organization, key, populate_existing=True)
        if row is None:
            return None
        org = Organization(id=row.id, name=row.name, domain=row.domain, is_active=row.is_active)
        self._fill_after_commit(db, keys.org_cache_key(str(key), self._namespace), org.to_raw())
        return org

    async def put_organization(self, name: str, *, domain: str | None = None, is_active: bool = True) -> uuid.UUID:
        async def insert(db: AsyncSession) -> uuid.UUID:
            statement = sa.insert(schema.Organization).values(name=name, domain=domain, is_active=is_active)
            org_id: uuid.UUID = (await db.execute(statement.returning(schema.Organization.id))).scalar_one()
            return org_id

        return await self._database.run(insert)

    # -- configs -------------------------------------------------------------------------------------------

    async def load_config_for_scope(
        self, scope: str, db: AsyncSession | None = None, *, cached: Sequence[Any] | None = None
    ) -> ConfigMap:
        """Every config visible in ``scope`` (``GLOBAL``, ``ORG:uuid`` or ``uuid``): global rows, overridden by
        the organization's own. Secret values stay encrypted. ``cached``: the scopes' cache entries as read
        already (``cache_keys``); None reads them."""
        org = None if scope == GLOBAL else _org_uuid(scope)
        if scope != GLOBAL and org is None:
            raise errors.InputError(scope, "scope must be GLOBAL, ORG:<uuid> or <uuid>")
        scopes = [GLOBAL] if org is None else [GLOBAL, str(org)]
        if cached is not None and len(cached) >= len(scopes):
            found = [_loads(value) for value in cached[: len(scopes)]]
        else:
            found = await self._get_many([keys.config_cache_key(s, self._namespace) for s in scopes])
        missing = [s for s, value in zip(scopes, found, strict=True) if value is None]
        if missing:
            if db is None:
                return await self._database.run(lambda own: self.load_config_for_scope(scope, db=own))
            for s in missing:
                rows = await _config_rows(db, None if s == GLOBAL else uuid.UUID(s))
                found[scopes.index(s)] = dict(rows)
                self._fill_after_commit(db, keys.config_cache_key(s, self._namespace), rows)
        merged: ConfigMap = {}
        for part in found:
            merged.update(part or {})
        return merged

    async def set_config(
        self,
        key: str,
        value: Any,
        *,
        config_type: str = "string",
        organization_id: uuid.UUID | None = None,
        db: AsyncSession | None = None,
    ) -> None:
        """Create or replace one config; secrets are encrypted before they reach the database."""
        if config_type not in schema.CONFIG_TYPES:
            raise errors.InputError(config_type, f"config type must be one of {', '.join(schema.CONFIG_TYPES)}")
        if db is None:
            await self._database.run(
                lambda own: self.set_config(
                    key, value, config_type=config_type, organization_id=organization_id, db=own
                )
            )
            return
        stored = self.secrets.encrypt(str(value)) if config_type == SECRET else value
        await db.execute(_upsert_config(key, {"value": stored}, config_type, organization_id))
        scope = GLOBAL if organization_id is None else str(organization_id)
        cache_key = keys.config_cache_key(scope, self._namespace)
        if not database.after_commit(db, lambda: self._delete(cache_key)):
            await self._delete(cache_key)  # the caller commits; the TTL bounds a stale refill meanwhile

    # -- Redis (failures degrade to the database, never fail an execution) ----------------------------------

    async def _get(self, key: str) -> dict[str, Any] | None:
        return (await self._get_many([key]))[0]

    async def _get_many(self, cache_keys: list[str]) -> list[dict[str, Any] | None]:
        try:
            raw = await _call(self._client.mget(cache_keys))
        except errors.CacheUnavailable as e:
            log.warning("config cache unavailable, reading PostgreSQL: %s", e)
            return [None] * len(cache_keys)
        return [_loads(value) for value in raw]

    def _fill_after_commit(self, db: AsyncSession, key: str, value: Mapping[str, Any]) -> None:
        payload = json.dumps(value)
        database.after_commit(db, lambda: self._best_effort(self._client.set(key, payload, ex=self._ttl_s)))

    async def _delete(self, key: str) -> None:
        await self._best_effort(self._client.delete(key))

    async def _best_effort(self, call: Awaitable[Any]) -> None:
        try:
            await _call(call)
        except errors.CacheUnavailable as e:
            log.warning("config cache write skipped: %s", e)


async def _config_rows(db: AsyncSession, organization_id: uuid.UUID | None) -> ConfigMap:
    column = schema.Config.organization_id
    where = column.is_(None) if organization_id is None else column == organization_id
    result = await db.execute(sa.select(schema.Config.key, schema.Config.value, schema.Config.config_type).where(where))
    return {key: RawConfigValue(value=_unwrap(value), type=kind) for key, value, kind in result}


def _upsert_config(key: str, value: Any, config_type: str, organization_id: uuid.UUID | None) -> Any:
    statement = pg.insert(schema.Config).values(
        key=key, value=value, config_type=config_type, organization_id=organization_id
    )
    if organization_id is None:
        target: dict[str, Any] = {"index_elements": ["key"], "index_where": schema.Config.organization_id.is_(None)}
    else:
        target = {
            "index_elements": ["organization_id", "key"],
            "index_where": schema.Config.organization_id.is_not(None),
        }
    return statement.on_conflict_do_update(
        **target,
        set_={"value": statement.excluded.value, "config_type": config_type, "updated_at": sa.func.now()},
    )


def _unwrap(value: Any) -> Any:
    """Bifrost stored ``{"value": v}``; a bare JSON value is accepted too."""
    return value.get("value") if isinstance(value, dict) and set(value) == {"value"} else value


def _org_uuid(org_id: str | uuid.UUID) -> uuid.UUID | None:
    if isinstance(org_id, uuid.UUID):
        return org_id
    try:
        return uuid.UUID(org_id.removeprefix("ORG:"))
    except ValueError:
        return None


def _organization(raw: Mapping[str, Any] | None) -> Organization | None:
    """The cached organization, or None (a miss) for an absent or unreadable entry."""
    try:
        return (
            None
            if raw is None
            else Organization(
                id=uuid.UUID(raw["id"]),
                name=str(raw["name"]),
                domain=raw.get("domain"),
                is_active=bool(raw["is_active"]),
            )
        )
    except (KeyError, TypeError, ValueError):
        return None


def _loads(value: str | bytes | None) -> dict[str, Any] | None:
    if value is None:
        return None
    try:
        data = json.loads(value)
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


async def _call(awaitable: Awaitable[T]) -> T:
    try:
        return await awaitable
    except (redis.exceptions.RedisError, OSError) as e:
        raise errors.CacheUnavailable(f"Redis failed: {errors.describe(e)}") from e
