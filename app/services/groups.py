"""Adapter groups: the registry hands out disjoint index sets, so any subset of a group composes exactly.

A group fixes a tenant's base model, a variant (`sbora_fa` or `sbora_fb`), the
rank r, the targeted layers and an index seed. Each layer's indices are one
permutation drawn from that seed, cut into blocks of r: slot k is block k of
every layer (`sbora_core.method.inject.draw_indices`). A job created in a group takes
the smallest free slot, in the same transaction that records the job (the
database's unique (group, slot) constraint settles concurrent creations, on
SQLite and PostgreSQL alike); the slot stays with the job's adapter and is
freed when the job ends without one or the adapter is deleted. A group holds
min over layers of dim // r members (FA r=8 over 576 input columns: 72).

A group is a single variant: FA adapters own columns and FB adapters rows, and
a column and a row always cross, so the two never compose.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any

from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session

from app import catalog
from app.errors import Conflict, Invalid, NotFound
from app.models import AdapterGroup, GroupSlot, Job, Tenant
from app.services.queries import delete_owned, owned, page
from sbora_core.method.config import ConfigError
from sbora_core.method.inject import draw_indices

CROSSING = ("a group holds sbora_fa or sbora_fb adapters: FA adapters own columns and FB adapters rows, and "
            "a column and a row always cross, so only one variant composes")


@dataclass
class LayerCapacity:
    name: str
    dimension: int  # what the variant selects from: d_in (FA) or d_out (FB)
    capacity: int  # dimension // r
    used: int
    free: int


def create_group(session: Session, tenant: Tenant, name: str, base_model: str, variant: str, r: int,
                 target_modules: list[str] | str) -> AdapterGroup:
    if variant not in ("sbora_fa", "sbora_fb"):
        raise Invalid("variant", f"variant: {CROSSING}; LoRA updates every weight and composes with nothing")
    try:
        catalog.source_of(base_model)
    except catalog.UnknownBaseModel as exc:
        raise Invalid("base_model", str(exc)) from exc
    try:
        catalog.check_method(base_model, {"variant": variant, "r": r, "target_modules": target_modules})
    except ConfigError as exc:
        raise Invalid(exc.field, str(exc)) from exc
    if session.scalar(select(AdapterGroup.id).where(AdapterGroup.tenant_id == tenant.id, AdapterGroup.name == name)):
        raise Conflict(f"name: you already have a group named {name!r}")
    group = AdapterGroup(tenant_id=tenant.id, name=name, base_model=base_model, variant=variant, r=r,
                         target_modules=[target_modules] if isinstance(target_modules, str) else list(target_modules),
                         index_seed=secrets.randbelow(2**31))
    session.add(group)
    session.commit()
    return group


def get_group(session: Session, tenant: Tenant, group_id: str) -> AdapterGroup:
    try:
        return owned(session, AdapterGroup, tenant, group_id, "group")
    except NotFound as exc:
        raise NotFound(str(exc), param="group") from exc


def list_groups(session: Session, tenant: Tenant, limit: int, offset: int) -> tuple[list[AdapterGroup], int]:
    query = select(AdapterGroup).where(AdapterGroup.tenant_id == tenant.id).order_by(AdapterGroup.created_at.desc())
    return page(session, query, limit, offset)


def delete_group(session: Session, tenant: Tenant, group_id: str) -> None:
    group = get_group(session, tenant, group_id)
    members = session.scalar(select(func.count()).select_from(GroupSlot).where(GroupSlot.group_id == group.id))
    if members:
        raise Conflict(f"group {group_id} still holds {members} member(s); delete their adapters or cancel "
                       "their jobs first")
    delete_owned(session, AdapterGroup, group, "group")
    session.commit()


def targets(group: AdapterGroup) -> list[str] | str:
    presets = (["all-linear"], ["attention"], ["mlp"])
    return group.target_modules[0] if group.target_modules in presets else list(group.target_modules)


def layer_shapes(group: AdapterGroup) -> dict[str, tuple[int, int]]:
    return catalog.target_shapes(group.base_model, {"variant": group.variant, "r": group.r,
                                                     "target_modules": targets(group)})


def capacity(group: AdapterGroup) -> int:
    """Members the group can hold: every layer must give each its own block of r indices."""
    dims = [selection_dim(group, shape) for shape in layer_shapes(group).values()]
    return min(dims) // group.r


def selection_dim(group: AdapterGroup, shape: tuple[int, int]) -> int:
    d_out, d_in = shape
    return d_in if group.variant == "sbora_fa" else d_out


def layer_capacities(session: Session, group: AdapterGroup) -> list[LayerCapacity]:
    used = members_count(session, group)
    out = []
    for name, shape in layer_shapes(group).items():
        dim = selection_dim(group, shape)
        out.append(LayerCapacity(name, dim, dim // group.r, used, dim // group.r - used))
    return out


@dataclass
class LayerOwners:
    name: str
    axis: str  # columns (FA) or rows (FB)
    dimension: int
    owners: dict[int, list[int]]  # slot -> the indices of this layer it owns


def index_map(session: Session, group: AdapterGroup) -> list[LayerOwners]:
    """Per layer, the columns or rows each member's slot owns (what its adapter changes there)."""
    slots = [slot.slot for slot, _ in members(session, group)]
    out = []
    for name, shape in layer_shapes(group).items():
        dim = selection_dim(group, shape)
        owners = {k: draw_indices(dim, group.r, group.index_seed, name, k).tolist() for k in slots}
        out.append(LayerOwners(name, "columns" if group.variant == "sbora_fa" else "rows", dim, owners))
    return out


def members_count(session: Session, group: AdapterGroup) -> int:
    return session.scalar(select(func.count()).select_from(GroupSlot).where(GroupSlot.group_id == group.id)) or 0


def members(session: Session, group: AdapterGroup) -> list[tuple[GroupSlot, Job | None]]:
    slots = session.scalars(select(GroupSlot).where(GroupSlot.group_id == group.id).order_by(GroupSlot.slot))
    return [(s, session.get(Job, s.job_id)) for s in slots]


def method_in_group(group: AdapterGroup, base_model: str, method: dict[str, Any], explicit: set[str]) -> dict[str, Any]:
    """The job's method inside `group`: the group's variant, rank, targets and index seed; fields the
    request set itself must agree with the group's (422 naming the one that does not)."""
    if base_model != group.base_model:
        raise Invalid("base_model", f"base_model: group {group.id} is for {group.base_model!r}, not {base_model!r}")
    fixed = {"variant": group.variant, "r": group.r, "target_modules": targets(group),
             "index_seed": group.index_seed}
    for field, value in fixed.items():
        if field in explicit and method[field] != value:
            why = f"; {CROSSING}" if field == "variant" else ""
            raise Invalid(f"method.{field}", f"method.{field}: group {group.id} has {field} {value!r}, the job "
                                             f"asks for {method[field]!r}; leave it out to take the group's{why}")
    return {**method, **fixed}


def allocate(session: Session, group: AdapterGroup, job_id: str) -> int:
    """Reserve the smallest free slot for `job_id`, in the caller's transaction; Conflict (409) when full.

    Two concurrent creations may pick the same slot: the unique constraint fails one of the commits,
    and the caller retries with a fresh look (see `jobs.create_job`).
    """
    taken = set(session.scalars(select(GroupSlot.slot).where(GroupSlot.group_id == group.id)))
    limit = capacity(group)
    free = next((k for k in range(limit) if k not in taken), None)
    if free is None:
        raise Conflict(f"group: group {group.id} is full: its capacity is {limit} adapters of r={group.r} on "
                       "these layers; delete a member's adapter, or create another group")
    session.add(GroupSlot(group_id=group.id, slot=free, job_id=job_id))
    return free


def keep(session: Session, job_id: str, adapter_id: str) -> None:
    """The job's adapter now holds its slot."""
    session.execute(update(GroupSlot).where(GroupSlot.job_id == job_id).values(adapter_id=adapter_id))


def release_job(session: Session, job_id: str) -> None:
    """A job that ended without an adapter gives its slot back."""
    session.execute(delete(GroupSlot).where(GroupSlot.job_id == job_id, GroupSlot.adapter_id.is_(None)))


def release_adapter(session: Session, adapter_id: str) -> None:
    session.execute(delete(GroupSlot).where(GroupSlot.adapter_id == adapter_id))
