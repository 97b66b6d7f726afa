"""Execution leases (issue 10): owner, fencing token, expiry, attempts and the pending reply on ``executions``;
the crash policy (``retries_on_crash``) on ``workflows``.

Idempotent (``IF NOT EXISTS``): revision 0001 creates the tables from the current model, so a database created
after this revision was written already has these columns; one at 0001 from before gets them here. Adding
columns with constant defaults is a catalog-only change in PostgreSQL >= 11 (no table rewrite).

Revision ID: 0002
"""

from __future__ import annotations

from alembic import op

from modcache import schema

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

_EXECUTION_COLUMNS = (
    ("lease_owner", "varchar(255)"),
    ("lease_token", "bigint NOT NULL DEFAULT 0"),
    ("lease_expires_at", "timestamptz"),
    ("attempt", "integer NOT NULL DEFAULT 0"),
    ("max_attempts", "integer NOT NULL DEFAULT 1"),
    ("reply_to", "varchar(255)"),
    ("correlation_id", "varchar(255)"),
    ("replied_at", "timestamptz"),
)


def upgrade() -> None:
    for name, definition in _EXECUTION_COLUMNS:
        op.execute(f"ALTER TABLE executions ADD COLUMN IF NOT EXISTS {name} {definition}")
    op.execute("ALTER TABLE workflows ADD COLUMN IF NOT EXISTS retries_on_crash integer NOT NULL DEFAULT 0")
    op.execute(
        f"CREATE INDEX IF NOT EXISTS {schema.LEASED_INDEX} ON executions (lease_expires_at) "
        "WHERE lease_owner IS NOT NULL OR status = 'RUNNING'"
    )


def downgrade() -> None:
    op.execute(f"DROP INDEX IF EXISTS {schema.LEASED_INDEX}")
    op.execute("ALTER TABLE workflows DROP COLUMN IF EXISTS retries_on_crash")
    for name, _ in reversed(_EXECUTION_COLUMNS):
        op.execute(f"ALTER TABLE executions DROP COLUMN IF EXISTS {name}")
