"""Source schema (Bifrost-shaped tables + executions) and the module NOTIFY trigger.

Revision ID: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from modcache import schema, triggers

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    bind = op.get_bind()
    if (bind.dialect.server_version_info or (0,)) < (13,):  # gen_random_uuid() is built in from 13 on
        op.execute("CREATE EXTENSION IF NOT EXISTS pgcrypto")
    schema.Base.metadata.create_all(bind)
    for statement in triggers.install_statements():
        op.execute(sa.text(statement))


def downgrade() -> None:
    for statement in triggers.uninstall_statements():
        op.execute(sa.text(statement))
    schema.Base.metadata.drop_all(op.get_bind())
