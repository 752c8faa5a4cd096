"""`sbora evals`: evaluations on a running server (create, show, list), results side by side.

    sbora evals create --dataset ds_... --grader multiple_choice -c smollm2-135m-instruct -c ad_... --watch
    sbora evals show eval_...            # each candidate's metrics with 95% intervals, paired differences
    sbora evals show eval_... --wrong ad_...   # the items that candidate got wrong
"""

from __future__ import annotations

import json
import time
from typing import Annotated, Any, Literal

import typer
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

from sbora_cli.client import DEFAULT_URL, ApiClient
from sbora_cli.remote import (
    TERMINAL_STATUSES,
    AsJson,
    Key,
    Url,
    console,
    fail,
    out,
    print_json,
    reports_errors,
    show_page,
    table,
    when,
)

evals_app = typer.Typer(no_args_is_help=True, help="Score the base, adapters and compositions on a dataset.")


def candidate(text: str) -> str | dict[str, Any]:
    """A model name, or a JSON object {"model": "ad_a+ad_b", "weights": [1, 0.5], "label": "mix"}."""
    if not text.lstrip().startswith("{"):
        return text
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise typer.BadParameter(f"--candidate: not JSON ({exc.msg}): {text}") from exc


def interval(metric: dict[str, Any], signed: bool = False) -> str:
    value = metric.get("value", metric.get("difference"))
    lo, hi = metric["ci95"]
    fmt = "{:+.4f}" if signed else "{:.4f}"
    return f"{fmt.format(value)} [{fmt.format(lo)}, {fmt.format(hi)}]"


def show_result(evaluation: dict[str, Any]) -> None:
    result = evaluation["result"]
    metrics = result["metrics"]
    t = table("candidate", *metrics, "correct", "wrong", "tokens")
    for c in result["candidates"]:
        t.add_row(escape(c["label"]), *(interval(c["metrics"][m]) for m in metrics),
                  "" if c["correct"] is None else str(c["correct"]), "" if c["wrong"] is None else str(c["wrong"]),
                  f"{c['tokens']:,}")
    out.print(t)
    if result["paired"]:
        paired = table("candidate", "versus", *(f"Δ {m}" for m in metrics))
        for p in result["paired"]:
            paired.add_row(escape(p["candidate"]), escape(p["versus"]),
                           *(interval(p["metrics"][m], signed=True) for m in metrics))
        out.print("\npaired differences on the same items (95% bootstrap intervals):")
        out.print(paired)


def watch(api: ApiClient, evaluation_id: str) -> dict[str, Any]:
    with Progress(TextColumn(evaluation_id), BarColumn(), MofNCompleteColumn(), console=console) as bar:
        handle = bar.add_task("", total=None)
        while True:
            evaluation = api.get_evaluation(evaluation_id)
            p = evaluation["progress"]
            bar.update(handle, completed=p.get("done", 0), total=p.get("total"))
            if evaluation["status"] in TERMINAL_STATUSES:
                return evaluation
            time.sleep(1.0)


@evals_app.command("create")
@reports_errors
def evals_create(
    dataset: Annotated[str, typer.Option(help="the items: a dataset id (from `sbora datasets upload`)")],
    candidates: Annotated[list[str], typer.Option("--candidate", "-c", help=(
        "repeat: a base model, an adapter id, ad_a+ad_b (composition), or a JSON object with model, weights, label"))],
    grader: Annotated[Literal["multiple_choice", "exact_match", "loss"], typer.Option()] = "multiple_choice",
    limit: Annotated[int | None, typer.Option(help="score a fixed random subset of this many items")] = None,
    max_new_tokens: Annotated[int | None, typer.Option(help="exact_match: tokens per answer at most")] = None,
    name: Annotated[str | None, typer.Option(help="a label for the evaluation")] = None,
    watch_it: Annotated[bool, typer.Option("--watch", help="follow it and print the results")] = False,
    url: Url = DEFAULT_URL, key: Key = None, as_json: AsJson = False,
) -> None:
    """Queue an evaluation; prints its id (with --watch, the results once it ends)."""
    spec: dict[str, Any] = {"dataset_id": dataset, "grader": grader, "candidates": [candidate(c) for c in candidates],
                            "name": name}
    spec.update({k: v for k, v in (("limit", limit), ("max_new_tokens", max_new_tokens)) if v is not None})
    with ApiClient(url, key) as api:
        evaluation = api.create_evaluation(spec)
        if not watch_it:
            return print_json(evaluation) if as_json else typer.echo(evaluation["id"])
        console.print(f"evaluation {evaluation['id']} queued")
        done = watch(api, evaluation["id"])
    if as_json:
        return print_json(done)
    if done["status"] != "succeeded":
        error = done.get("error") or {}
        fail(f"evaluation {done['id']} {done['status']}" + (f": {error.get('code')}: {error.get('message')}"
                                                             if error else ""))
    show_result(done)


@evals_app.command("show")
@reports_errors
def evals_show(
    evaluation_id: str,
    wrong: Annotated[str | None, typer.Option(help="list the items this candidate (label) got wrong")] = None,
    url: Url = DEFAULT_URL, key: Key = None, as_json: AsJson = False,
) -> None:
    """One evaluation: status and progress, or its results side by side."""
    with ApiClient(url, key) as api:
        evaluation = api.get_evaluation(evaluation_id)
        items = api.evaluation_items(evaluation_id, wrong, False, limit=1000) if wrong else None
    if as_json:
        return print_json(items if items is not None else evaluation)
    if items is not None:
        t = table("item", "line", "output")
        for i in items["data"]:
            t.add_row(str(i["item"]), str(i["line"]), escape(json.dumps(i["output"])[:200]))
        return show_page(items, t, f"items {wrong} got wrong")
    p = evaluation["progress"]
    typer.echo(f"{evaluation['id']}  {evaluation['status']}  {evaluation['settings']['grader']} on "
               f"{evaluation['dataset_id']} ({evaluation['base_model']}), {p.get('done', 0)}/{p.get('total') or '?'} "
               "item results")
    if evaluation.get("error"):
        typer.echo(f"error: {evaluation['error']['code']}: {evaluation['error']['message']}")
    if evaluation["result"]:
        show_result(evaluation)


@evals_app.command("list")
@reports_errors
def evals_list(
    status: Annotated[str | None, typer.Option(help="queued, running, succeeded, failed or cancelled")] = None,
    url: Url = DEFAULT_URL, key: Key = None, as_json: AsJson = False, limit: int = 50, offset: int = 0,
) -> None:
    """Evaluations of your tenant, newest first."""
    with ApiClient(url, key) as api:
        page = api.list_evaluations(status, limit, offset)
    if as_json:
        return print_json(page)
    t = table("id", "name", "status", "grader", "dataset", "candidates", "created")
    for e in page["data"]:
        t.add_row(e["id"], escape(e["name"] or ""), e["status"], e["settings"]["grader"], e["dataset_id"],
                  escape(", ".join(c["label"] for c in e["candidates"])), when(e["created_at"]))
    show_page(page, t, "evaluations")


def register(app: typer.Typer) -> None:
    app.add_typer(evals_app, name="evals")
