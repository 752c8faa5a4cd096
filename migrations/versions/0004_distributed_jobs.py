"""jobs on several devices and machines: a job's resources, the devices and address a worker
offers, and the slots of a gang forming for a job that spans several machines

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01 10:00:00
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("resources", sa.JSON(), nullable=False, server_default=sa.text("'{}'")))
    with op.batch_alter_table("workers", schema=None) as batch_op:
        batch_op.add_column(sa.Column("devices", sa.Integer(), nullable=False, server_default="1"))
        batch_op.add_column(sa.Column("address", sa.String(length=200), nullable=True))
    op.create_table(
        "gang_slots",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("job_id", sa.String(length=40), nullable=False),
        sa.Column("formation", sa.Integer(), nullable=False),
        sa.Column("slot", sa.Integer(), nullable=False),
        sa.Column("worker_node", sa.String(length=200), nullable=False),
        sa.Column("hostname", sa.String(length=200), nullable=False),
        sa.Column("endpoint", sa.String(length=300), nullable=True),
        sa.Column("claimed_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("job_id", "formation", "slot"),
        sa.UniqueConstraint("job_id", "formation", "hostname"),
    )
    with op.batch_alter_table("gang_slots", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_gang_slots_job_id"), ["job_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("gang_slots", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_gang_slots_job_id"))
    op.drop_table("gang_slots")
    with op.batch_alter_table("workers", schema=None) as batch_op:
        batch_op.drop_column("address")
        batch_op.drop_column("devices")
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_column("resources")
