"""Base models added and removed at run time (admin keys only; `sbora models add` on the server).

A registered model is checked before anything is recorded (a causal LM with a
tokenizer and linear layers to adapt), fingerprinted like every base, and kept
in the database, so every API process and worker offers it by name at once.
"""

from __future__ import annotations

import re
from pathlib import Path

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app import catalog
from app.errors import Conflict, Invalid, NotFound
from app.models import UNFINISHED_STATUSES, Adapter, AdapterGroup, Job, RegisteredModel
from sbora_core.method import models

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


def default_name(source: str) -> str:
    """A directory's name, or a hub id's last part (`org/Model-1B` -> `Model-1B`)."""
    return Path(source.rstrip("/")).name


def register_model(session: Session, source: str, name: str | None = None) -> RegisteredModel:
    source = source.strip()
    if not source:
        raise Invalid("source", "source: give a model directory (config.json + *.safetensors) or a hub id (org/name)")
    path = Path(source).expanduser()
    if path.exists() and not path.is_dir():
        raise Invalid("source", f"source: {source} is a file; give the directory holding config.json and the weights")
    if name is None:  # the name comes from the source: a source without one is the source's fault
        name = default_name(source)
        if not NAME.fullmatch(name):
            raise Invalid("source", f"source: {source!r} gives no usable model name ({name!r}); give a model "
                                    "directory or hub id ending in the model's name, or pass `name`")
    if not NAME.fullmatch(name):
        raise Invalid("name", f"name: {name!r} must be 1-100 letters, digits, '.', '_' or '-', starting with a "
                              "letter or digit")
    if name in catalog.offered(fresh=True):
        raise Conflict(f"name: a base model named {name!r} is offered already; choose another name")
    catalog.use_model_cache()
    # A directory is stored as an absolute path: workers start elsewhere; a hub id stays an id.
    stored = str(path.resolve()) if path.is_dir() else source
    try:
        directory = models.resolve_model(stored)
        facts = models.describe_model(directory)
    except models.UnknownModelError as exc:
        raise Invalid("source", str(exc).replace("base_model:", "source:", 1)) from exc
    except models.NotACausalLM as exc:
        raise Invalid("source", f"source: {source} cannot be a base model: {exc}") from exc
    entry = RegisteredModel(name=name, source=stored, **facts)
    session.add(entry)
    try:
        session.flush()
    except IntegrityError as exc:  # registered by someone else meanwhile
        session.rollback()
        raise Conflict(f"name: a base model named {name!r} is offered already; choose another name") from exc
    return entry


def get_registered(session: Session, name: str) -> RegisteredModel:
    entry = session.get(RegisteredModel, name)
    if entry is None:
        if name in catalog.configured():
            raise Conflict(f"{name} is configured by SBORA_MODELS, not registered: remove it there and restart")
        raise NotFound(f"no registered base model named {name!r}")
    return entry


def remove_model(session: Session, name: str) -> None:
    """Forget a registered model; Conflict while unfinished jobs, adapters or groups use it."""
    entry = get_registered(session, name)
    users = {
        "unfinished jobs": session.scalar(select(func.count()).select_from(Job).where(
            Job.base_model == name, Job.status.in_(UNFINISHED_STATUSES))),
        "adapters": session.scalar(select(func.count()).select_from(Adapter).where(Adapter.base_model == name)),
        "adapter groups": session.scalar(select(func.count()).select_from(AdapterGroup).where(
            AdapterGroup.base_model == name)),
    }
    in_use = ", ".join(f"{count} {what}" for what, count in users.items() if count)
    if in_use:
        raise Conflict(f"{name} is in use ({in_use}, across all tenants): cancel or delete those first")
    session.delete(entry)
    session.flush()
