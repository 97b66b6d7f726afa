"""The key that seals the cache's status record (attack-9d F1, ``lineage.KEY_TABLE``): a lineage record in Redis
that nobody with this key sealed is not believed, so a write to the status hash cannot lock modcache out of its
source. Idempotent, as 0002 and 0003.

Revision ID: 0004
"""

from __future__ import annotations

from alembic import op

from modcache import lineage

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    for statement in lineage.KEY_STATEMENTS:
        op.execute(statement)


def downgrade() -> None:
    op.execute(f"DROP TABLE IF EXISTS {lineage.KEY_TABLE}")
