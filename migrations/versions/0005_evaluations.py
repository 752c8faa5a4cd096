"""evaluation jobs: jobs get a kind and an eval_after; evaluations and their per-item results

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-30 12:00:00
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("kind", sa.String(length=16), nullable=False, server_default="train"))
        batch_op.add_column(sa.Column("eval_after", sa.JSON(), nullable=True))
        batch_op.create_index(batch_op.f("ix_jobs_kind"), ["kind"], unique=False)
    op.create_table(
        "evaluations",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("tenant_id", sa.String(length=40), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=True),
        sa.Column("dataset_id", sa.String(length=40), nullable=False),
        sa.Column("base_model", sa.String(length=500), nullable=False),
        sa.Column("spec", sa.JSON(), nullable=False),
        sa.Column("candidates", sa.JSON(), nullable=False),
        sa.Column("source_job_id", sa.String(length=40), nullable=True),
        sa.Column("result", sa.JSON(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["id"], ["jobs.id"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenants.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("evaluations", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_evaluations_tenant_id"), ["tenant_id"], unique=False)
    op.create_table(
        "evaluation_items",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("evaluation_id", sa.String(length=40), nullable=False),
        sa.Column("candidate", sa.Integer(), nullable=False),
        sa.Column("item", sa.Integer(), nullable=False),
        sa.Column("line", sa.Integer(), nullable=False),
        sa.Column("correct", sa.Boolean(), nullable=True),
        sa.Column("values", sa.JSON(), nullable=False),
        sa.Column("output", sa.JSON(), nullable=False),
        sa.Column("tokens", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(["evaluation_id"], ["evaluations.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("evaluation_id", "candidate", "item"),
    )
    with op.batch_alter_table("evaluation_items", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_evaluation_items_evaluation_id"), ["evaluation_id"], unique=False)


def downgrade() -> None:
    op.drop_table("evaluation_items")
    op.drop_table("evaluations")
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_jobs_kind"))
        batch_op.drop_column("eval_after")
        batch_op.drop_column("kind")
