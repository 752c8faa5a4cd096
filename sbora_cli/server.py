"""Commands that run the service on this machine: serve, worker, migrate, keys, models."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from sbora_cli.local import console, fail
from sbora_cli.supervisor import Supervised

keys_app = typer.Typer(no_args_is_help=True, help="Create, list and revoke API keys (run on the server).")
models_app = typer.Typer(help="List the base models the service offers; add and remove them (run on the server).")
LOCAL_TENANT = "local"


def worker_kind() -> str:
    """cpu or gpu: what the worker's name says it trains on."""
    import torch

    return "gpu" if torch.cuda.is_available() else "cpu"


def worker_command_line(queue: str | None = None, name: str = "worker") -> list[str]:
    """One worker per GPU: one job at a time, a fresh child process per job (frees all memory)."""
    from app.core.config import get_settings

    return [sys.executable, "-m", "celery", "-A", "worker.tasks", "worker",
            "-Q", queue or get_settings().train_queue, "--concurrency", "1", "--pool", "prefork",
            "--max-tasks-per-child", "1", "--loglevel", "INFO", "-n", f"{name}@%h"]


def migrate_command() -> None:
    """Apply database migrations (the API also does this at start)."""
    from app.migrate import upgrade_database

    upgrade_database()
    console.print("database is at the latest revision")


def worker_command(
    queue: Annotated[str | None, typer.Option(help="queue to consume (default SBORA_TRAIN_QUEUE)")] = None,
) -> None:
    """Run one training worker in the foreground (start one per GPU, with CUDA_VISIBLE_DEVICES set)."""
    kind = worker_kind()
    device = os.environ.get("CUDA_VISIBLE_DEVICES", "") if kind == "gpu" else ""
    os.execv(sys.executable, worker_command_line(queue, name=f"{kind}{device}"))


def local_key(data_dir: Path) -> str:
    """The key `sbora serve` prints: kept in the data directory (mode 0600) and reused while valid.

    It is an admin key: whoever runs the server on their machine may also add base models to it."""
    from app.core.db import session_scope
    from app.core.security import create_api_key, tenant_for_key

    path = data_dir / "local-api-key"
    with session_scope() as session:
        if path.is_file() and tenant_for_key(session, path.read_text().strip(), scope="admin") is not None:
            return path.read_text().strip()
        _, plain = create_api_key(session, LOCAL_TENANT, name="printed by sbora serve", scope="admin")
    path.write_text(plain + "\n")
    path.chmod(0o600)
    return plain


def _exit_on_sigterm(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)  # the shell's convention for "ended by this signal"


def serve_command(
    host: Annotated[str | None, typer.Option(help="bind address (default SBORA_HOST)")] = None,
    port: Annotated[int | None, typer.Option(help="port (default SBORA_PORT)")] = None,
    worker: Annotated[bool, typer.Option(help="also start one training worker")] = True,
) -> None:
    """Run the API and one worker: migrations, a local API key, then the server until Ctrl-C or SIGTERM."""
    import uvicorn

    from app import catalog
    from app.core.config import get_settings
    from app.logs import configure_logging
    from app.migrate import upgrade_database

    settings = get_settings()
    host, port = host or settings.host, port or settings.port
    upgrade_database()
    for model_id in catalog.offered():
        console.print(f"preparing base model {model_id} ...")
        catalog.prepare(model_id)  # the default model converts once, here
    key = local_key(settings.data_dir)
    url = f"http://{host}:{port}"
    # Plain lines (no wrapping or markup) so they can be copied into a shell; the key alone on
    # stdout, so `KEY=$(sbora serve ... | head -1)`-style scripts and eyes find it, whatever the
    # worker prints on stderr.
    typer.echo(f"\nsbora-server at {url}  (API docs: {url}/docs)", err=True)
    typer.echo(f"API key for tenant '{LOCAL_TENANT}' (next line), for the shell:", err=True)
    typer.echo(f"  export SBORA_URL={url} SBORA_API_KEY={key}\n", err=True)
    typer.echo(key)
    sys.stdout.flush()
    configure_logging()
    command = worker_command_line(name=worker_kind())
    supervisor = Supervised("worker", lambda: subprocess.Popen(command)) if worker else None
    # uvicorn shuts down gracefully on SIGTERM, then raises the signal again under the handler it
    # found: with the default one the process would die there, before `finally` stops the worker.
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        if supervisor is not None:
            supervisor.start()
        uvicorn.run("app.main:app", host=host, port=port, log_config=None)
    finally:
        if supervisor is not None:
            supervisor.stop()


@keys_app.command("create")
def keys_create(tenant: Annotated[str, typer.Option(help="tenant the key belongs to (created if new)")],
                name: Annotated[str, typer.Option(help="a label for the key")] = "",
                admin: Annotated[bool, typer.Option(help="may also add and remove base models (POST /models)")]
                = False) -> None:
    """Create a key and print it (shown once; only its hash is stored)."""
    from app.core.db import session_scope
    from app.core.security import create_api_key
    from app.migrate import upgrade_database

    upgrade_database()
    with session_scope() as session:
        key, plain = create_api_key(session, tenant, name, scope="admin" if admin else "tenant")
        key_id = key.id
    console.print(f"{'admin ' if admin else ''}key {key_id} for tenant {tenant}")
    typer.echo(plain)


@keys_app.command("list")
def keys_list() -> None:
    from sqlalchemy import select

    from app.core.db import session_scope
    from app.models import ApiKey, Tenant

    table = Table("id", "tenant", "scope", "prefix", "name", "created", "revoked")
    # `sbora keys revoke` needs the id whole: never wrapped or cut, whatever the terminal's width.
    table.columns[0].no_wrap, table.columns[0].min_width = True, len("key_") + 24
    with session_scope() as session:
        for key, tenant in session.execute(select(ApiKey, Tenant).join(Tenant, ApiKey.tenant_id == Tenant.id)
                                           .order_by(ApiKey.created_at)):
            table.add_row(key.id, tenant.name, key.scope, key.prefix + "…", key.name, f"{key.created_at:%Y-%m-%d %H:%M}",
                          f"{key.revoked_at:%Y-%m-%d %H:%M}" if key.revoked_at else "")
    Console().print(table)  # a listing: stdout


@keys_app.command("revoke")
def keys_revoke(key_id: str) -> None:
    """Revoke a key by its id (from `sbora keys list`); requests with it then answer 401."""
    from app.core.db import session_scope
    from app.core.security import revoke_api_key

    with session_scope() as session:
        if not revoke_api_key(session, key_id):
            fail(f"no active key with id {key_id}")
    console.print(f"revoked {key_id}")


@models_app.callback(invoke_without_command=True)
def models_list(ctx: typer.Context) -> None:
    """The base models the service offers (SBORA_MODELS and those added), then others this machine has."""
    if ctx.invoked_subcommand is not None:
        return
    from app import catalog
    from app.migrate import upgrade_database
    from sbora_core.method.models import available_models

    upgrade_database()
    offered, configured = catalog.offered(), catalog.configured()
    table = Table("name", "origin", "source")
    for name, source in offered.items():
        table.add_row(name, "configured" if name in configured else "registered", source)
    Console().print(table)
    others = [name for name in available_models() if name not in offered]
    if others:
        console.print(f"also on this machine (for `sbora train`): {', '.join(others)}")


@models_app.command("add")
def models_add(source: Annotated[str, typer.Argument(help="a model directory (config.json + *.safetensors) or a "
                                                          "hub id (org/name)")],
               name: Annotated[str | None, typer.Option(help="public id (default: the directory's name)")] = None,
               ) -> None:
    """Offer another base model to every tenant: checked, fingerprinted and recorded in the database."""
    from app.core.db import session_scope
    from app.errors import Conflict, Invalid
    from app.migrate import upgrade_database
    from app.services.base_models import register_model

    upgrade_database()
    try:
        with session_scope() as session:
            entry = register_model(session, source, name)
            summary = (entry.name, entry.model_type, entry.num_hidden_layers, entry.hidden_size,
                       entry.context_length, entry.has_chat_template)
    except (Invalid, Conflict) as exc:
        fail(str(exc))
    model_name, model_type, layers, hidden, context, chat = summary
    console.print(f"added {model_name}: {model_type}, {layers} layers of width {hidden}, context {context}, "
                  f"{'a' if chat else 'no'} chat template")


@models_app.command("remove")
def models_remove(name: str) -> None:
    """Stop offering a model added with `sbora models add` (refused while jobs or adapters use it)."""
    from app.core.db import session_scope
    from app.errors import Conflict, NotFound
    from app.services.base_models import remove_model

    try:
        with session_scope() as session:
            remove_model(session, name)
    except (Conflict, NotFound) as exc:
        fail(str(exc))
    console.print(f"removed {name}")


def register(app: typer.Typer) -> None:
    app.command("serve")(serve_command)
    app.command("worker")(worker_command)
    app.command("migrate")(migrate_command)
    app.add_typer(keys_app, name="keys")
    app.add_typer(models_app, name="models")
