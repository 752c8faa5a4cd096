"""Commands that run on this machine: train a job file, validate a dataset, evaluate a task file."""

from __future__ import annotations

import json
import shutil
import signal
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
import yaml
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
)
from rich.table import Table

console = Console(stderr=True)


def fail(message: str, code: int = 1) -> NoReturn:
    # soft_wrap: an error naming a long path stays one line that can be copied whole.
    console.print(f"[red]error:[/red] {message}", soft_wrap=True)
    raise typer.Exit(code)


def read_job_file(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        fail(f"{path}: no such file")
    except yaml.YAMLError as exc:
        fail(f"{path}: not valid YAML ({exc})")
    if not isinstance(data, dict):
        fail(f"{path}: expected a mapping with base_model, train_file, output_dir, method, hyperparameters")
    # Relative data paths are relative to the job file, so a job directory can move as a whole.
    for key in ("train_file", "val_file", "output_dir"):
        if isinstance(data.get(key), str) and not Path(data[key]).is_absolute():
            data[key] = str((path.parent / data[key]).resolve())
    return data


def train_here(job: Any, callbacks: Any, resume: bool) -> Any:
    """In this process, or on `resources.devices` ranks of this machine (torchrun)."""
    import os

    from sbora_core.training.launch import LaunchSettings, RankFailure, train_on_ranks
    from sbora_core.training.train import train

    resources = job.resources
    if resources.world_size == 1:
        return train(job, callbacks, resume=resume)
    if resources.nodes > 1:
        fail("resources.nodes: `sbora train` runs on this machine; a job across machines runs through the "
             "service (`sbora jobs create --nodes N`)")
    settings = LaunchSettings(devices=resources.devices,
                              threads_per_rank=max(1, (os.cpu_count() or 1) // resources.devices))
    run_dir = Path(job.output_dir) / ".ranks"  # kept after a failure: its torchrun.log says more
    try:
        result = train_on_ranks(job, callbacks, run_dir, settings, resume=resume)
    except RankFailure as exc:
        fail(f"{exc} (torchrun's log: {run_dir / 'torchrun.log'})")
    assert result is not None  # one machine: rank 0 is here
    shutil.rmtree(run_dir, ignore_errors=True)
    return result


def train_command(
    config: Annotated[Path, typer.Option("--config", "-c", help="job file (YAML or JSON)")],
    no_resume: Annotated[bool, typer.Option("--no-resume", help="ignore existing checkpoints")] = False,
) -> None:
    """Fine-tune a base model from a job file; Ctrl-C checkpoints, rerunning resumes."""
    from sbora_cli.training_progress import ConsoleCallbacks
    from sbora_core.training.data import DatasetError
    from sbora_core.training.job import TrainJob

    try:
        job = TrainJob.from_dict(read_job_file(config))
    except (TypeError, ValueError) as exc:
        fail(f"{config}: {exc}")
    columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[tps]} tok/s"), TimeRemainingColumn()]
    with Progress(*columns, console=console) as bar:
        callbacks = ConsoleCallbacks(bar)
        previous = signal.signal(signal.SIGINT, callbacks.interrupt)
        try:
            result = train_here(job, callbacks, resume=not no_resume)
        except DatasetError as exc:
            for problem in exc.report.errors:
                console.print(f"  {problem}")
            fail(f"{job.train_file}: fix the problems above")
        except ValueError as exc:
            fail(str(exc))
        finally:
            signal.signal(signal.SIGINT, previous)
    if result.status == "cancelled":
        console.print(f"cancelled at step {result.metrics['steps']}; rerun the same command to resume "
                      f"from {result.last_checkpoint}")
        raise typer.Exit(130)
    m = result.metrics
    console.print(f"[green]done[/green]: {m['steps']} steps, train loss {m['train_loss']:.4f}"
                  + (f", val loss {m['val_loss']:.4f}" if m["val_loss"] is not None else "")
                  + f", {m['wall_time_s']:.0f} s")
    typer.echo(str(result.adapter_dir))


def validate_command(
    dataset: Annotated[Path, typer.Argument(help="JSONL or JSON dataset")],
    model: Annotated[str | None, typer.Option(help="base model, for token statistics")] = None,
    max_seq_len: int = 1024,
    batch_size: int = 4,
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
) -> None:
    """Check a dataset before training (or an evaluation set): every problem with its line number, and statistics."""
    from sbora_core.training.data import validate_dataset
    from sbora_core.training.eval_items import validate_eval_dataset

    tokenizer = None
    if model:
        from transformers import AutoTokenizer

        from sbora_core.method.models import resolve_model

        tokenizer = AutoTokenizer.from_pretrained(resolve_model(model))
    if not dataset.is_file():
        fail(f"{dataset}: no such file")
    report = validate_eval_dataset(dataset) or validate_dataset(dataset, tokenizer, max_seq_len=max_seq_len,
                                                                batch_size=batch_size)
    if as_json:
        typer.echo(json.dumps(report.to_dict(), default=str, indent=2))
    else:
        for p in report.errors:
            console.print(f"[red]error[/red] {p}")
        for p in report.warnings:
            console.print(f"[yellow]warning[/yellow] {p}")
        if report.more_problems:
            console.print(f"... and {report.more_problems} more")
        console.print(f"format {report.format}, {report.records} records"
                      + (f", {report.total_tokens} tokens (mean {report.mean_tokens:.0f}, max {report.max_tokens})"
                         if report.total_tokens is not None else "")
                      + (f", {report.steps_per_epoch} steps per epoch at batch {batch_size}"
                         if report.steps_per_epoch else ""))
    raise typer.Exit(0 if report.ok else 1)


def eval_command(
    task: Annotated[list[Path], typer.Option("--task", "-t", help="task file(s) in instruction format")],
    model: Annotated[str, typer.Option(help="base model")] = "smollm2-135m-instruct",
    adapter: Annotated[Path | None, typer.Option(help="adapter directory to apply")] = None,
    protocol: Annotated[str, typer.Option(help="multiple choice: option_text or label")] = "option_text",
    limit: Annotated[int | None, typer.Option(help="evaluate a fixed random subset of this size")] = None,
    batch_size: int = 8,
    max_new_tokens: int = 256,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Accuracy of a base model, with or without an adapter, on task files."""
    from sbora_core.method.adapter_io import apply_adapter, load_adapter
    from sbora_core.method.models import load_base_model
    from sbora_core.training.evaluate import evaluate_file

    base = load_base_model(model)
    if adapter is not None:
        try:
            apply_adapter(base.model, load_adapter(adapter), base.fingerprint)
        except ValueError as exc:
            fail(str(exc))
    table = Table("task", "protocol", "items", "accuracy")
    results = []
    for path in task:
        with Progress(TextColumn(path.stem), BarColumn(), MofNCompleteColumn(), console=console) as bar:
            handle = bar.add_task(path.stem, total=None)

            def advance(done: int, total: int, bar: Progress = bar, handle: TaskID = handle) -> None:
                bar.update(handle, completed=done, total=total)

            result = evaluate_file(base.model, base.tokenizer, path, protocol=protocol, limit=limit,
                                   batch_size=batch_size, max_new_tokens=max_new_tokens, progress=advance)
        results.append({k: v for k, v in result.items() if k != "outcomes"})
        table.add_row(result["task"], result["protocol"], str(result["items"]), f"{result['accuracy']:.1%}")
    if as_json:
        typer.echo(json.dumps(results, indent=2))
    else:
        Console().print(table)


def register(app: typer.Typer) -> None:
    app.command("train")(train_command)
    app.command("validate")(validate_command)
    app.command("eval")(eval_command)
