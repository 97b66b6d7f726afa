"""modcache: keeps a Bifrost-compatible Redis module cache converged to PostgreSQL.

Layers, top to bottom (held by the import-linter contracts in ``pyproject.toml``, run by ``./dev test``):

* entry points: ``modcache.cli``, ``modcache_operator``, ``modcache_consumer``;
* the engine and watcher that drive a sync: ``modcache.engine``, ``modcache.watcher``;
* adapters at the edges: ``modcache.pgsource`` (PostgreSQL), ``modcache.rediscache`` (Redis);
* a pure core: ``modcache.plan``, ``modcache.modules``, ``modcache.keys``, ``modcache.errors``.
"""

__version__ = "0.1.0"
