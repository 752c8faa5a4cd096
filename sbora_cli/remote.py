"""Commands that drive a running sbora-server over HTTP: datasets, jobs, adapters, generate.

Results a script wants (ids, paths, generated text, `--json` bodies) go to stdout; tables are
printed there too; progress, notes and errors go to stderr. Server and connection errors end
the command with exit status 1 and one readable message, never a traceback.
"""

from __future__ import annotations

import functools
import json
import sys
import time
from contextlib import closing
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Literal

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from sbora_cli.client import DEFAULT_URL, ApiClient, ApiError

console = Console(stderr=True, soft_wrap=True)  # soft_wrap: an error stays one line when piped
# Piped tables are not cut to 80 columns: ids must survive `| grep` and `| awk`.
out = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 4096)
TERMINAL_STATUSES = ("succeeded", "failed", "cancelled")

Url = Annotated[str, typer.Option("--url", envvar="SBORA_URL", help="server address")]
Key = Annotated[str | None, typer.Option("--key", envvar="SBORA_API_KEY", help="API key", show_default=False)]
AsJson = Annotated[bool, typer.Option("--json", help="print the server's JSON response (for scripts)")]

datasets_app = typer.Typer(no_args_is_help=True, help="Upload and list training datasets on a server.")
jobs_app = typer.Typer(no_args_is_help=True, help="Start, follow and cancel fine-tuning jobs on a server.")
adapters_app = typer.Typer(no_args_is_help=True, help="List and download trained adapters from a server.")
groups_app = typer.Typer(no_args_is_help=True, help="Adapter groups: members get disjoint index sets and compose.")


def fail(message: str, details: list[str] | tuple[str, ...] = ()) -> None:
    console.print(f"[red]error:[/red] {escape(message)}")
    for line in details:
        console.print(f"  {escape(line)}")
    raise typer.Exit(1)


def reports_errors(command):
    """Turn an ApiError (or an unwritable output file) into `error: ...` and exit status 1."""

    @functools.wraps(command)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except ApiError as exc:
            if exc.status == 401:
                exc.details.append("the CLI sends --key or $SBORA_API_KEY")
            fail(exc.message, exc.details)
        except OSError as exc:
            fail(f"{exc.filename or ''}: {exc.strerror or exc}")
        except KeyboardInterrupt:
            raise typer.Exit(130) from None

    return run


def print_json(body: Any) -> None:
    typer.echo(json.dumps(body, indent=2))


def when(stamp: str | None) -> str:
    """A server timestamp in local time (SQLite hands back naive UTC times)."""
    if not stamp:
        return ""
    moment = datetime.fromisoformat(stamp)
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).astimezone().strftime("%Y-%m-%d %H:%M")


def size(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n / 1e3:.1f} kB"


def table(*columns: str) -> Table:
    t = Table(*columns, box=None, pad_edge=False)
    for column in t.columns:  # ids are copied into later commands: fold long text rather than cut it
        column.overflow = "fold"
    t.columns[0].no_wrap = True
    return t


def show_page(page: dict[str, Any], t: Table, what: str) -> None:
    out.print(t) if page["data"] else console.print(f"no {what}")
    if page["total"] > len(page["data"]):
        console.print(f"[dim]{len(page['data'])} of {page['total']} {what}; use --limit/--offset for more[/dim]")


# -- datasets ----------------------------------------------------------------------------------
@datasets_app.command("upload")
@reports_errors
def datasets_upload(
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, readable=True, help="JSONL or JSON dataset")],
    url: Url = DEFAULT_URL, key: Key = None, as_json: AsJson = False,
) -> None:
    """Upload a dataset; the server validates it first and lists every problem with its line number."""
    with ApiClient(url, key) as api:
        dataset = api.upload_dataset(file)
    if as_json:
        return print_json(dataset)
    stats = dataset["stats"]
    console.print(f"{escape(dataset['filename'])}: {dataset['format']}, {dataset['records']} records, "
                  f"{stats.get('total_tokens')} tokens, {stats.get('steps_per_epoch')} steps per epoch "
                  f"at batch {stats.get('steps_per_epoch_batch_size')}")
    for warning in stats.get("warnings") or []:
        console.print(f"[yellow]warning[/yellow] line {warning['line']}: {escape(warning['message'])}")
    typer.echo(dataset["id"])


@datasets_app.command("list")
@reports_errors
def datasets_list(url: Url = DEFAULT_URL, key: Key = None, as_json: AsJson = False,
                  limit: int = 50, offset: int = 0) -> None:
    """Datasets of your tenant, newest first."""
    with ApiClient(url, key) as api:
        page = api.list_datasets(limit, offset)
    if as_json:
        return print_json(page)
    t = table("id", "file", "format", "records", "tokens", "size", "created")
    for d in page["data"]:
        t.add_row(d["id"], escape(d["filename"]), d["format"], str(d["records"]),
                  str(d["stats"].get("total_tokens", "")), size(d["size_bytes"]), when(d["created_at"]))
    show_page(page, t, "datasets")


# -- jobs --------------------------------------------------------------------------------------
def job_spec(dataset: str, model: str | None, variant: str | None, r: int | None, alpha: float | None,
             hyperparameters: dict[str, Any], validation_dataset: str | None, quantization: str | None,
             name: str | None, group: str | None = None, resources: dict[str, Any] | None = None,
             objective: dict[str, Any] | None = None) -> dict[str, Any]:
    """A JobCreate body holding only what was given, so the server's defaults apply to the rest;
    `objective` holds objective, beta, loss and init_adapter_id."""
    method = {k: v for k, v in (("variant", variant), ("r", r), ("alpha", alpha)) if v is not None}
    spec: dict[str, Any] = {"training_dataset_id": dataset, "method": method,
                            "hyperparameters": {k: v for k, v in hyperparameters.items() if v is not None}}
    if given := {k: v for k, v in (resources or {}).items() if v is not None}:
        spec["resources"] = given
    for field, value in (("base_model", model), ("validation_dataset_id", validation_dataset),
                         ("quantization", quantization), ("name", name), ("group", group),
                         *(objective or {}).items()):
        if value is not None:
            spec[field] = value
    return spec


def resources_text(resources: dict[str, Any]) -> str:
    """`2 devices x 2 nodes, sharding full`; empty for one device on one node, unsharded."""
    devices, nodes, sharding = resources.get("devices", 1), resources.get("nodes", 1), resources.get("sharding", "none")
    if (devices, nodes, sharding) == (1, 1, "none"):
        return ""
    return f"{devices} devices x {nodes} node{'s' if nodes > 1 else ''}, sharding {sharding}"


def loss_text(p: dict[str, Any]) -> str:
    return f"{p['loss']:.4f}" if p.get("loss") is not None else ""


def steps_text(p: dict[str, Any]) -> str:
    return f"{p['step']}/{p['total_steps']}" if p.get("total_steps") else ""


def progress_text(p: dict[str, Any]) -> str:
    if not p.get("total_steps"):
        return ""
    return steps_text(p) + (f", loss {loss_text(p)}" if loss_text(p) else "")


def method_text(job: dict[str, Any], alpha: bool = True) -> str:
    m = job["method"]
    return f"{m.get('variant')} r={m.get('r')}" + (f" alpha={m.get('alpha')}" if alpha else "")


class JobBar:
    """A rich progress bar for one job: step/total, loss, tokens/s and time left."""

    def __init__(self, bar: Progress, job: dict[str, Any]) -> None:
        self.bar = bar
        self.task = bar.add_task(job["id"], total=None, loss="-", tps="-")
        self.show(job["progress"])

    @property
    def total_known(self) -> bool:
        return self.bar.tasks[0].total is not None

    def show(self, p: dict[str, Any]) -> None:
        fields: dict[str, Any] = {"completed": p.get("step") or 0}
        if p.get("total_steps"):
            fields["total"] = p["total_steps"]
        if p.get("loss") is not None:
            fields["loss"] = loss_text(p)
        if p.get("tokens_per_s") is not None:
            fields["tps"] = f"{p['tokens_per_s']:,.0f}"
        self.bar.update(self.task, **fields)


def follow_events(api: ApiClient, job_id: str, job_bar: JobBar) -> None:
    """Feed the bar from the job's event stream until the server says the job ended."""
    with closing(api.job_events(job_id)) as events:
        for event in events:
            if event.event == "end":
                return
            body = event.data if isinstance(event.data, dict) else {}
            if event.event == "metric":
                # Metric events carry step, loss and speed, not the total: the job row has it.
                metric = body.get("data") or {}
                job_bar.show(metric if job_bar.total_known else api.get_job(job_id)["progress"])
            elif body.get("message"):
                job_bar.bar.console.print(f"[dim]{escape(body['message'])}[/dim]", highlight=False)


def watch_job(api: ApiClient, job_id: str) -> dict[str, Any]:
    """Show the job's progress until it ends; returns the finished job."""
    job = api.get_job(job_id)
    columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[tps]} tok/s"),
               TimeRemainingColumn()]
    with Progress(*columns, console=console) as bar:
        job_bar = JobBar(bar, job)
        if job["status"] not in TERMINAL_STATUSES:
            try:
                follow_events(api, job_id, job_bar)
            except ApiError as exc:
                if exc.status:  # the server refused: polling would be refused too
                    raise
                console.print(f"[yellow]event stream lost ({escape(exc.message)}); polling instead[/yellow]")
        # After `end` the job is finished already; after a lost stream this polls until it is.
        while (job := api.get_job(job_id))["status"] not in TERMINAL_STATUSES:
            job_bar.show(job["progress"])
            time.sleep(1.0)
        job_bar.show(job["progress"])
    return job


def report_outcome(job: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print_json(job)
    if job["status"] == "succeeded":
        p = job["progress"]
        loss = f", loss {loss_text(p)}" if loss_text(p) else ""
        console.print(f"[green]succeeded[/green]: {p.get('step')} steps{loss}; adapter {job['adapter_id']}")
        if not as_json:
            typer.echo(job["adapter_id"])
        return
    error = job.get("error") or {}
    reason = f": {error.get('code')}: {error.get('message')}" if error else ""
    fail(f"job {job['id']} {job['status']}{reason}")


def watching(api: ApiClient, job_id: str, as_json: bool) -> None:
    try:
        job = watch_job(api, job_id)
    except KeyboardInterrupt:
        console.print(f"stopped watching; the job goes on (`sbora jobs cancel {job_id}` stops it)")
        raise typer.Exit(130) from None
    report_outcome(job, as_json)


@jobs_app.command("create")
@reports_errors
def jobs_create(
    dataset: Annotated[str, typer.Option(help="training dataset id (from `sbora datasets upload`)")],
    model: Annotated[str | None, typer.Option(help="base model (default: the server's)")] = None,
    variant: Annotated[Literal["sbora_fa", "sbora_fb", "lora"] | None, typer.Option()] = None,
    r: Annotated[int | None, typer.Option("--r", help="rank")] = None,
    alpha: float | None = None,
    max_steps: int | None = None,
    epochs: int | None = None,
    learning_rate: float | None = None,
    batch_size: int | None = None,
    max_seq_len: int | None = None,
    validation_dataset: Annotated[str | None, typer.Option(help="validation dataset id")] = None,
    quantization: Annotated[Literal["none", "nf4", "int8"] | None, typer.Option()] = None,
    name: Annotated[str | None, typer.Option(help="a label for the job")] = None,
    group: Annotated[str | None, typer.Option(help="an adapter group: the job takes a free slot of it")] = None,
    devices: Annotated[int | None, typer.Option(help="devices (GPUs) on each node: one rank each")] = None,
    nodes: Annotated[int | None, typer.Option(help="machines the job spans")] = None,
    sharding: Annotated[Literal["none", "full"] | None,
                        typer.Option(help="full: shard the frozen base over the ranks (FSDP2)")] = None,
    objective: Annotated[Literal["sft", "dpo"] | None,
                         typer.Option(help="dpo: preference training on a preference dataset")] = None,
    beta: Annotated[float | None, typer.Option(help="dpo: the pull towards the reference (default 0.1)")] = None,
    loss: Annotated[Literal["sigmoid", "ipo"] | None, typer.Option(help="dpo: the loss")] = None,
    init_adapter: Annotated[str | None, typer.Option(help="an adapter id to start from (e.g. SFT, then DPO)")] = None,
    watch: Annotated[bool, typer.Option("--watch", help="follow it and print the adapter id at the end")] = False,
    url: Url = DEFAULT_URL, key: Key = None, as_json: AsJson = False,
) -> None:
    """Queue a fine-tuning job (options left out take the server's defaults)."""
    hyperparameters = {"max_steps": max_steps, "epochs": epochs, "learning_rate": learning_rate,
                       "batch_size": batch_size, "max_seq_len": max_seq_len}
    spec = job_spec(dataset, model, variant, r, alpha, hyperparameters, validation_dataset, quantization, name, group,
                    {"devices": devices, "nodes": nodes, "sharding": sharding},
                    {"objective": objective, "beta": beta, "loss": loss, "init_adapter_id": init_adapter})
    with ApiClient(url, key) as api:
        job = api.create_job(spec)
        if not watch:
            return print_json(job) if as_json else typer.echo(job["id"])
        # With --watch, stdout gets only the outcome (the adapter id), so `AD=$(...)` works.
        console.print(f"job {job['id']} queued")
        watching(api, job["id"], as_json)


@jobs_app.command("list")
@reports_errors
def jobs_list(
    status: Annotated[str | None, typer.Option(help="queued, running, succeeded, failed or cancelled")] = None,
    url: Url = DEFAULT_URL, key: Key = None, as_json: AsJson = False, limit: int = 50, offset: int = 0,
) -> None:
    """Jobs of your tenant, newest first."""
    with ApiClient(url, key) as api:
        page = api.list_jobs(status, limit, offset)
    if as_json:
        return print_json(page)
    t = table("id", "name", "status", "model", "method", "steps", "loss", "adapter", "created")
    t.columns[7].no_wrap = True
    for j in page["data"]:
        p = j["progress"]
        t.add_row(j["id"], escape(j["name"] or ""), j["status"], escape(j["base_model"]),
                  method_text(j, alpha=False), steps_text(p), loss_text(p), j["adapter_id"] or "", when(j["created_at"]))
    show_page(page, t, "jobs")


@jobs_app.command("show")
@reports_errors
def jobs_show(job_id: str, url: Url = DEFAULT_URL, key: Key = None, as_json: AsJson = False) -> None:
    """One job: status, settings, progress, error and adapter."""
    with ApiClient(url, key) as api:
        job = api.get_job(job_id)
    if as_json:
        return print_json(job)
    p, error = job["progress"], job.get("error")
    rows = [
        ("id", job["id"]), ("name", job["name"] or ""), ("status", job["status"]),
        ("model", f"{job['base_model']} (quantization {job['quantization']})"), ("method", method_text(job)),
        ("hyperparameters", ", ".join(f"{k}={v}" for k, v in job["hyperparameters"].items())),
        ("resources", resources_text(job.get("resources") or {})),
        ("datasets", job["training_dataset_id"] + (f" (validation {job['validation_dataset_id']})"
                                                    if job["validation_dataset_id"] else "")),
        ("progress", progress_text(p) + (f", {p['tokens_per_s']:,.0f} tok/s" if p.get("tokens_per_s") else "")),
        ("error", f"{error['code']}: {error['message']}" if error else ""),
        ("adapter", job["adapter_id"] or ""),
        ("created", when(job["created_at"])), ("finished", when(job["finished_at"])),
    ]
    for label, value in rows:
        if value:
            typer.echo(f"{label:<16} {value}")


@jobs_app.command("cancel")
@reports_errors
def jobs_cancel(job_id: str, url: Url = DEFAULT_URL, key: Key = None, as_json: AsJson = False) -> None:
    """Cancel a job: a queued one ends at once, a running one after its current optimiser step."""
    with ApiClient(url, key) as api:
        job = api.cancel_job(job_id)
    if as_json:
        return print_json(job)
    console.print(f"job {job['id']} cancelled" if job["status"] == "cancelled"
                  else f"job {job['id']}: cancellation requested; it stops after the current step")


@jobs_app.command("watch")
@reports_errors
def jobs_watch(job_id: str, url: Url = DEFAULT_URL, key: Key = None, as_json: AsJson = False) -> None:
    """Follow a job with a progress bar; prints the adapter id on success, exits 1 on failure or cancel."""
    with ApiClient(url, key) as api:
        watching(api, job_id, as_json)


# -- adapters ----------------------------------------------------------------------------------
@adapters_app.command("list")
@reports_errors
def adapters_list(
    base_model: Annotated[str | None, typer.Option(help="only adapters of this base model")] = None,
    url: Url = DEFAULT_URL, key: Key = None, as_json: AsJson = False, limit: int = 50, offset: int = 0,
) -> None:
    """Adapters of your tenant, newest first."""
    with ApiClient(url, key) as api:
        page = api.list_adapters(base_model, limit, offset)
    if as_json:
        return print_json(page)
    t = table("id", "name", "base model", "method", "size", "job", "created")
    for a in page["data"]:
        t.add_row(a["id"], escape(a["name"] or ""), escape(a["base_model"]), f"{a['variant']} r={a['r']}",
                  size(a["size_bytes"]), a["job_id"] or "", when(a["created_at"]))
    show_page(page, t, "adapters")


@adapters_app.command("download")
@reports_errors
def adapters_download(
    adapter_id: str,
    format: Annotated[Literal["sparse", "peft"], typer.Option(help="sparse (SBoRA's own) or peft (PEFT's LoRA)")]
    = "sparse",
    output: Annotated[Path, typer.Option("--output", "-o", help="file or directory to write the zip to")]
    = Path("."),
    url: Url = DEFAULT_URL, key: Key = None,
) -> None:
    """Download an adapter as a zip (adapter_config.json + adapter_model.safetensors); prints its path."""
    with ApiClient(url, key) as api:
        path = api.download_adapter(adapter_id, output, format)
    console.print(f"{path.stat().st_size:,} bytes")
    typer.echo(str(path))


# -- generation --------------------------------------------------------------------------------
@reports_errors
def generate_command(
    prompt: Annotated[str, typer.Argument(help="the user message (or the raw prompt, with --raw)")],
    model: Annotated[str | None, typer.Option(help="base model (default: the adapter's base)")] = None,
    adapter: Annotated[list[str] | None, typer.Option("--adapter", "-a",
                                                      help="adapter id; repeat to compose adapters")] = None,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    seed: int | None = None,
    raw: Annotated[bool, typer.Option("--raw", help="send the text as is, without the chat template")] = False,
    url: Url = DEFAULT_URL, key: Key = None,
) -> None:
    """Generate text, streamed to stdout as it arrives."""
    body: dict[str, Any] = {"prompt": prompt} if raw else {"messages": [{"role": "user", "content": prompt}]}
    body.update(max_new_tokens=max_new_tokens, temperature=temperature)
    for field, value in (("base_model", model), ("seed", seed)):
        if value is not None:
            body[field] = value
    if adapter:
        body["adapter_id"] = adapter[0] if len(adapter) == 1 else adapter
    with ApiClient(url, key) as api, closing(api.generate_stream(body)) as events:
        for event in events:
            if event.event == "token":
                sys.stdout.write(event.data["text"])
                sys.stdout.flush()
            elif event.event == "done":
                sys.stdout.write("\n")
                done = event.data
                console.print(f"[dim]{done['completion_tokens']} tokens, {done['finish_reason']}[/dim]")
                return
            elif event.event == "error":
                sys.stdout.write("\n")
                fail(f"generation failed: {event.data.get('detail')}")
    fail("the server closed the stream before generation finished")


# -- groups ------------------------------------------------------------------------------------
@groups_app.command("create")
@reports_errors
def groups_create(
    name: str,
    model: Annotated[str | None, typer.Option(help="base model (default: the server's)")] = None,
    variant: Annotated[Literal["sbora_fa", "sbora_fb"], typer.Option()] = "sbora_fa",
    r: Annotated[int, typer.Option("--r", help="rank of every member")] = 8,
    target: Annotated[list[str] | None, typer.Option(help="a layer name or preset to adapt (repeat; "
                                                          "default: all-linear)")] = None,
    url: Url = DEFAULT_URL, key: Key = None, as_json: AsJson = False,
) -> None:
    """Create a group; prints its id (jobs take `--group ID`)."""
    spec: dict[str, Any] = {"name": name, "variant": variant, "r": r}
    if model:
        spec["base_model"] = model
    if target:  # one preset goes as itself; names as a list
        spec["target_modules"] = target[0] if target in (["all-linear"], ["attention"], ["mlp"]) else target
    with ApiClient(url, key) as api:
        group = api.create_group(spec)
    if as_json:
        return print_json(group)
    console.print(f"group {escape(name)}: room for {group['capacity']} adapters of {variant} r={r}")
    typer.echo(group["id"])


@groups_app.command("list")
@reports_errors
def groups_list(url: Url = DEFAULT_URL, key: Key = None, as_json: AsJson = False, limit: int = 50,
                offset: int = 0) -> None:
    """Your groups, newest first."""
    with ApiClient(url, key) as api:
        page = api.list_groups(limit, offset)
    if as_json:
        return print_json(page)
    t = table("id", "name", "base model", "method", "members", "free", "created")
    for g in page["data"]:
        t.add_row(g["id"], escape(g["name"]), escape(g["base_model"]), f"{g['variant']} r={g['r']}",
                  str(g["used"]), str(g["free"]), when(g["created_at"]))
    show_page(page, t, "groups")


@groups_app.command("show")
@reports_errors
def groups_show(group_id: str, url: Url = DEFAULT_URL, key: Key = None, as_json: AsJson = False) -> None:
    """A group: its members by slot, and each layer's capacity."""
    with ApiClient(url, key) as api:
        group = api.get_group(group_id)
    if as_json:
        return print_json(group)
    typer.echo(f"{group['id']}  {group['name']}  {group['variant']} r={group['r']} on {group['base_model']}: "
               f"{group['used']} of {group['capacity']} slots used")
    t = table("slot", "job", "status", "adapter")
    for m in group["members"]:
        t.add_row(str(m["slot"]), m["job_id"], m["status"] or "", m["adapter_id"] or "")
    Console().print(t)
    smallest = min(group["layers"], key=lambda layer: layer["capacity"])
    typer.echo(f"{len(group['layers'])} layers; the narrowest, {smallest['name']} ({smallest['dimension']} "
               f"{'columns' if group['variant'] == 'sbora_fa' else 'rows'}), sets the capacity")


def register(app: typer.Typer) -> None:
    app.add_typer(datasets_app, name="datasets")
    app.add_typer(jobs_app, name="jobs")
    app.add_typer(adapters_app, name="adapters")
    app.add_typer(groups_app, name="groups")
    app.command("generate")(generate_command)
