from __future__ import annotations

from dataclasses import asdict
from typing import Annotated

from fastapi import APIRouter, Query, status

from app.api.deps import CurrentTenant, SessionDep
from app.models import AdapterGroup
from app.schemas import (
    GroupCreate,
    GroupDetail,
    GroupIndexMap,
    GroupLayer,
    GroupLayerOwners,
    GroupMember,
    GroupPublic,
    Page,
)
from app.services import groups

router = APIRouter(prefix="/groups", tags=["groups"])


def public(group: AdapterGroup, used: int) -> GroupPublic:
    capacity = groups.capacity(group)
    return GroupPublic(id=group.id, owner=group.tenant_id, name=group.name, base_model=group.base_model,
                       variant=group.variant, r=group.r, target_modules=group.target_modules, capacity=capacity,
                       used=used, free=capacity - used, created_at=group.created_at, updated_at=group.updated_at)


@router.post("", status_code=status.HTTP_201_CREATED, response_model=GroupPublic)
def create_group(spec: GroupCreate, session: SessionDep, tenant: CurrentTenant) -> GroupPublic:
    """A group of composable adapters: jobs created with `group` get disjoint index sets from it."""
    group = groups.create_group(session, tenant, spec.name, spec.base_model, spec.variant, spec.r,
                                spec.target_modules)
    return public(group, 0)


@router.get("", response_model=Page[GroupPublic])
def list_groups(session: SessionDep, tenant: CurrentTenant, limit: Annotated[int, Query(ge=1, le=200)] = 50,
                offset: Annotated[int, Query(ge=0, le=10**9)] = 0) -> Page[GroupPublic]:
    rows, total = groups.list_groups(session, tenant, limit, offset)
    return Page(data=[public(g, groups.members_count(session, g)) for g in rows], total=total, limit=limit,
                offset=offset)


@router.get("/{group_id}", response_model=GroupDetail)
def get_group(group_id: str, session: SessionDep, tenant: CurrentTenant) -> GroupDetail:
    """The group, its members by slot and each layer's capacity, used and free."""
    group = groups.get_group(session, tenant, group_id)
    members = [GroupMember(slot=s.slot, job_id=s.job_id, adapter_id=s.adapter_id, status=job.status if job else None)
               for s, job in groups.members(session, group)]
    layers = [GroupLayer(**asdict(layer)) for layer in groups.layer_capacities(session, group)]
    return GroupDetail(**public(group, len(members)).model_dump(), layers=layers, members=members)


@router.get("/{group_id}/index-map", response_model=GroupIndexMap)
def group_index_map(group_id: str, session: SessionDep, tenant: CurrentTenant) -> GroupIndexMap:
    """Per layer, which columns (FA) or rows (FB) each member owns: the dashboard draws it."""
    group = groups.get_group(session, tenant, group_id)
    members = [GroupMember(slot=s.slot, job_id=s.job_id, adapter_id=s.adapter_id, status=job.status if job else None)
               for s, job in groups.members(session, group)]
    layers = [GroupLayerOwners(**asdict(layer)) for layer in groups.index_map(session, group)]
    return GroupIndexMap(group_id=group.id, members=members, layers=layers)


@router.delete("/{group_id}", status_code=status.HTTP_204_NO_CONTENT)
def delete_group(group_id: str, session: SessionDep, tenant: CurrentTenant) -> None:
    """Only an empty group (409 while it holds members)."""
    groups.delete_group(session, tenant, group_id)
