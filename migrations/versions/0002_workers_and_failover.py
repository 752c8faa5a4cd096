"""worker heartbeats; jobs record their worker and the attempt their last message was for; checkpoints
registered as adapters; adapter groups and their slots

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28 17:00:00
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "workers",
        sa.Column("node", sa.String(length=200), nullable=False),
        sa.Column("hostname", sa.String(length=200), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("queue", sa.String(length=100), nullable=False),
        sa.Column("kind", sa.String(length=8), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_seen_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("job_id", sa.String(length=40), nullable=True),
        sa.Column("idle_since", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("node"),
    )
    with op.batch_alter_table("workers", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_workers_queue"), ["queue"], unique=False)
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("worker_node", sa.String(length=200), nullable=True))
        batch_op.add_column(sa.Column("enqueued_attempt", sa.Integer(), nullable=False, server_default="0"))
        batch_op.add_column(sa.Column("enqueued_at", sa.DateTime(timezone=True), nullable=True))
    with op.batch_alter_table("adapters", schema=None) as batch_op:
        batch_op.add_column(sa.Column("checkpoint_step", sa.Integer(), nullable=True))
    op.create_table(
        "adapter_groups",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("tenant_id", sa.String(length=40), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("base_model", sa.String(length=500), nullable=False),
        sa.Column("variant", sa.String(length=16), nullable=False),
        sa.Column("r", sa.Integer(), nullable=False),
        sa.Column("target_modules", sa.JSON(), nullable=False),
        sa.Column("index_seed", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenants.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("tenant_id", "name"),
    )
    with op.batch_alter_table("adapter_groups", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_adapter_groups_tenant_id"), ["tenant_id"], unique=False)
    op.create_table(
        "group_slots",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("group_id", sa.String(length=40), nullable=False),
        sa.Column("slot", sa.Integer(), nullable=False),
        sa.Column("job_id", sa.String(length=40), nullable=False),
        sa.Column("adapter_id", sa.String(length=40), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["group_id"], ["adapter_groups.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("group_id", "slot"),
        sa.UniqueConstraint("job_id"),
    )
    with op.batch_alter_table("group_slots", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_group_slots_group_id"), ["group_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_group_slots_adapter_id"), ["adapter_id"], unique=False)


def downgrade() -> None:
    op.drop_table("group_slots")
    op.drop_table("adapter_groups")
    with op.batch_alter_table("adapters", schema=None) as batch_op:
        batch_op.drop_column("checkpoint_step")
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_column("enqueued_at")
        batch_op.drop_column("enqueued_attempt")
        batch_op.drop_column("worker_node")
    with op.batch_alter_table("workers", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_workers_queue"))
    op.drop_table("workers")
