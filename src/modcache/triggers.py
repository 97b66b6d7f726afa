"""The NOTIFY trigger on ``workspace_files``: one source for the migration and ``modcache db install-trigger``.

Statement-level triggers with transition tables send the *paths* of changed module rows (never content) on
``keys.NOTIFY_CHANNEL`` after commit, chunked to stay under PostgreSQL's 8000-byte payload limit, so a
10,000-row UPDATE costs a few dozen notifications rather than 10,000. A row counts when it was or becomes a
module, and something that decides what workers import changed: path, content, hash, soft delete or type.
Both the old and the new path of a rename are sent. TRUNCATE asks for a full resync.

Payloads: ``{"paths": ["a.py", ...]}`` or ``{"resync": true}``. They are hints: listeners re-read the rows.
"""

from __future__ import annotations

from modcache import keys

FUNCTION = "modcache_notify_modules"
TRIGGERS = {
    "modcache_notify_insert": "INSERT",
    "modcache_notify_update": "UPDATE",
    "modcache_notify_delete": "DELETE",
}
TRUNCATE_TRIGGER = "modcache_notify_truncate"
PAYLOAD_LIMIT_BYTES = 7000

FUNCTION_SQL = f"""
CREATE OR REPLACE FUNCTION {FUNCTION}() RETURNS trigger LANGUAGE plpgsql AS $fn$
DECLARE
    changed text[];
    batch text[] := '{{}}';
    batch_bytes int := 0;
    item text;
    item_bytes int;
BEGIN
    IF TG_OP = 'TRUNCATE' THEN
        PERFORM pg_notify('{keys.NOTIFY_CHANNEL}', '{{"resync": true}}');
        RETURN NULL;
    ELSIF TG_OP = 'INSERT' THEN
        SELECT array_agg(DISTINCT path) INTO changed FROM new_rows WHERE entity_type = 'module';
    ELSIF TG_OP = 'DELETE' THEN
        SELECT array_agg(DISTINCT path) INTO changed FROM old_rows WHERE entity_type = 'module';
    ELSE
        SELECT array_agg(DISTINCT p) INTO changed
        FROM old_rows o JOIN new_rows n ON n.id = o.id
        CROSS JOIN LATERAL unnest(ARRAY[o.path, n.path]) AS p
        WHERE (o.entity_type = 'module' OR n.entity_type = 'module')
          AND ((o.path, o.content_hash, o.is_deleted, o.entity_type)
                   IS DISTINCT FROM (n.path, n.content_hash, n.is_deleted, n.entity_type)
               OR o.content IS DISTINCT FROM n.content);
    END IF;
    IF changed IS NULL THEN
        RETURN NULL;
    END IF;
    FOREACH item IN ARRAY changed LOOP
        item_bytes := octet_length(to_json(item)::text) + 1;
        IF batch_bytes + item_bytes > {PAYLOAD_LIMIT_BYTES} AND batch_bytes > 0 THEN
            PERFORM pg_notify('{keys.NOTIFY_CHANNEL}', json_build_object('paths', batch)::text);
            batch := '{{}}';
            batch_bytes := 0;
        END IF;
        batch := batch || item;
        batch_bytes := batch_bytes + item_bytes;
    END LOOP;
    PERFORM pg_notify('{keys.NOTIFY_CHANNEL}', json_build_object('paths', batch)::text);
    RETURN NULL;
END
$fn$;
"""


def _trigger_sql(name: str, event: str) -> str:
    transition = {"INSERT": "NEW TABLE AS new_rows", "DELETE": "OLD TABLE AS old_rows"}.get(
        event, "OLD TABLE AS old_rows NEW TABLE AS new_rows"
    )
    return (
        f"CREATE TRIGGER {name} AFTER {event} ON workspace_files REFERENCING {transition} "
        f"FOR EACH STATEMENT EXECUTE FUNCTION {FUNCTION}()"
    )


def install_statements() -> list[str]:
    """Idempotent: replaces the function and recreates the triggers (run them in one transaction)."""
    statements = [FUNCTION_SQL]
    for name, event in TRIGGERS.items():
        statements += [f"DROP TRIGGER IF EXISTS {name} ON workspace_files", _trigger_sql(name, event)]
    statements += [
        f"DROP TRIGGER IF EXISTS {TRUNCATE_TRIGGER} ON workspace_files",
        f"CREATE TRIGGER {TRUNCATE_TRIGGER} AFTER TRUNCATE ON workspace_files "
        f"FOR EACH STATEMENT EXECUTE FUNCTION {FUNCTION}()",
    ]
    return statements


def uninstall_statements() -> list[str]:
    names = [*TRIGGERS, TRUNCATE_TRIGGER]
    return [f"DROP TRIGGER IF EXISTS {n} ON workspace_files" for n in names] + [f"DROP FUNCTION IF EXISTS {FUNCTION}()"]
