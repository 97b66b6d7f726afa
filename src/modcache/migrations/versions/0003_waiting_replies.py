"""Callers waiting for a running execution (attack-10 F3): a request for an execution that runs under a live lease,
from another reply queue or correlation id than the one the row replies to, is recorded here and answered with the
outcome, by the owner or by the sweep that sends an owed reply.

Idempotent (``IF NOT EXISTS``), as 0002; a constant default is a catalog-only change.

Revision ID: 0003
"""

from __future__ import annotations

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("ALTER TABLE executions ADD COLUMN IF NOT EXISTS waiting_replies jsonb NOT NULL DEFAULT '[]'::jsonb")


def downgrade() -> None:
    op.execute("ALTER TABLE executions DROP COLUMN IF EXISTS waiting_replies")
