"""The `sbora` remote commands, run as real subprocesses against a live server and a real worker."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import zipfile

import httpx
import pytest
from stack import LiveServer, chat_lines, embedded_stack_with_worker, free_port

TINY = "tiny-llama"
TRAIN_ARGS = ["--model", TINY, "--r", "4", "--alpha", "8", "--max-steps", "4", "--batch-size", "4",
              "--max-seq-len", "128", "--learning-rate", "0.01"]


@pytest.fixture(scope="module")
def live(tmp_path_factory, tiny_model_dir):
    """The embedded stack (SQLite + filesystem broker) with one worker, behind a real uvicorn server."""
    with embedded_stack_with_worker(tmp_path_factory.mktemp("cli"), tiny_model_dir) as stack:
        from app.main import create_app

        server = LiveServer(create_app())
        server.key = stack.key("alice")
        yield server
        server.stop()


def sbora(live, *args: str, key: str | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "SBORA_URL": live.url, "SBORA_API_KEY": key or live.key, "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "sbora_cli.main", *args], env=env, capture_output=True,
                          text=True, timeout=timeout)


def no_traceback(result: subprocess.CompletedProcess) -> None:
    assert "Traceback" not in result.stdout + result.stderr, result.stderr


@pytest.fixture(scope="module")
def dataset_id(live, tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "colours.jsonl"
    path.write_bytes(chat_lines(24))
    result = sbora(live, "datasets", "upload", str(path))
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


@pytest.fixture(scope="module")
def trained(live, dataset_id):
    """(job id, adapter id) of a job created with --watch."""
    result = sbora(live, "jobs", "create", "--dataset", dataset_id, *TRAIN_ARGS, "--name", "cli", "--watch",
                   timeout=180)
    assert result.returncode == 0, result.stderr
    job_id = re.search(r"job (job_\w+) queued", result.stderr).group(1)
    return job_id, result.stdout.strip().splitlines()[-1]


def api_get(live, path: str) -> dict:
    return httpx.get(live.url + path, headers={"Authorization": f"Bearer {live.key}"}).json()


def test_upload_returns_an_id_and_lists_it(live, dataset_id):
    assert dataset_id.startswith("ds_")
    listed = sbora(live, "datasets", "list")
    assert listed.returncode == 0 and dataset_id in listed.stdout and "colours.jsonl" in listed.stdout
    as_json = json.loads(sbora(live, "datasets", "list", "--json").stdout)
    assert [d["id"] for d in as_json["data"]] == [dataset_id]


def test_upload_of_a_bad_file_names_the_line(live, tmp_path):
    lines = chat_lines(24).decode().splitlines(keepends=True)
    lines[2] = "this is not JSON\n"
    path = tmp_path / "broken.jsonl"
    path.write_text("".join(lines))
    result = sbora(live, "datasets", "upload", str(path))
    assert result.returncode == 1
    assert "line 3:" in result.stderr and "422" in result.stderr
    no_traceback(result)


def test_create_watch_ends_with_the_adapter_of_a_succeeded_job(live, trained):
    job_id, adapter_id = trained
    job = api_get(live, f"/jobs/{job_id}")
    assert job["status"] == "succeeded" and job["adapter_id"] == adapter_id
    assert job["progress"]["step"] == 4 and job["method"]["r"] == 4

    shown = json.loads(sbora(live, "jobs", "show", job_id, "--json").stdout)
    assert shown["id"] == job_id and shown["adapter_id"] == adapter_id
    human = sbora(live, "jobs", "show", job_id).stdout
    assert "succeeded" in human and adapter_id in human
    listed = sbora(live, "jobs", "list", "--status", "succeeded")
    assert job_id in listed.stdout and "4/4" in listed.stdout
    # Watching a finished job reports its outcome again.
    watched = sbora(live, "jobs", "watch", job_id)
    assert watched.returncode == 0 and watched.stdout.strip() == adapter_id


def test_download_writes_the_adapter_zip(live, trained, tmp_path):
    _, adapter_id = trained
    assert adapter_id in sbora(live, "adapters", "list", "--base-model", TINY).stdout
    for fmt in ("sparse", "peft"):
        result = sbora(live, "adapters", "download", adapter_id, "--format", fmt, "-o", str(tmp_path))
        assert result.returncode == 0, result.stderr
        path = result.stdout.strip()
        assert path.startswith(str(tmp_path)) and path.endswith(".zip")
        assert "adapter_model.safetensors" in zipfile.ZipFile(path).namelist()
    target = tmp_path / "mine.zip"
    assert sbora(live, "adapters", "download", adapter_id, "-o", str(target)).returncode == 0
    assert zipfile.is_zipfile(target)


def test_generate_streams_text_with_the_adapter(live, trained):
    _, adapter_id = trained
    result = sbora(live, "generate", "--adapter", adapter_id, "--max-new-tokens", "8", "--temperature", "1",
                   "--seed", "1", "--raw", "Item 2: which colour?")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()
    assert "8 tokens" in result.stderr or "stop" in result.stderr


def test_a_running_job_cancelled_makes_watch_fail(live, dataset_id):
    created = sbora(live, "jobs", "create", "--dataset", dataset_id, *TRAIN_ARGS[:-4], "--max-steps", "5000")
    job_id = created.stdout.strip()
    assert created.returncode == 0 and job_id.startswith("job_"), created.stderr
    assert sbora(live, "jobs", "cancel", job_id).returncode == 0
    watched = sbora(live, "jobs", "watch", job_id)
    assert watched.returncode == 1 and f"job {job_id} cancelled" in watched.stderr
    no_traceback(watched)


def test_http_errors_are_one_readable_line(live, dataset_id):
    wrong_key = sbora(live, "jobs", "list", key="sbora-wrong")
    assert wrong_key.returncode == 1 and "401" in wrong_key.stderr and "API key" in wrong_key.stderr
    no_traceback(wrong_key)

    unknown = sbora(live, "jobs", "show", "job_000000000000000000000000")
    assert unknown.returncode == 1 and "not found" in unknown.stderr.lower()
    no_traceback(unknown)

    too_big = sbora(live, "jobs", "create", "--dataset", dataset_id, "--model", TINY, "--r", "100000")
    assert too_big.returncode == 1 and "method.r" in too_big.stderr
    no_traceback(too_big)

    refused = sbora(live, "datasets", "list", "--url", f"http://127.0.0.1:{free_port()}")
    assert refused.returncode == 1 and "cannot connect" in refused.stderr
    no_traceback(refused)


def test_groups_create_list_show_and_jobs_take_slots(live, dataset_id):
    created = sbora(live, "groups", "create", "colours", "--model", TINY, "--r", "4", "--target", "q_proj",
                    "--target", "v_proj")
    assert created.returncode == 0, created.stderr
    group_id = created.stdout.strip()
    assert group_id.startswith("grp_") and "room for 16 adapters" in created.stderr
    job_ids = []
    for _ in range(2):
        job = sbora(live, "jobs", "create", "--dataset", dataset_id, "--model", TINY, "--group", group_id,
                    "--max-steps", "2", "--json")
        assert job.returncode == 0, job.stderr
        job_ids.append(json.loads(job.stdout)["id"])
        assert json.loads(job.stdout)["method"]["target_modules"] == ["q_proj", "v_proj"]
    shown = sbora(live, "groups", "show", group_id)
    assert shown.returncode == 0, shown.stderr
    assert "2 of 16 slots used" in shown.stdout and all(j in shown.stdout for j in job_ids)
    assert group_id in sbora(live, "groups", "list").stdout
    for job_id in job_ids:
        sbora(live, "jobs", "cancel", job_id)
    wrong = sbora(live, "jobs", "create", "--dataset", dataset_id, "--model", TINY, "--group", group_id,
                  "--variant", "sbora_fb")
    assert wrong.returncode == 1 and "variant" in wrong.stderr
    no_traceback(wrong)


def test_resources_flags_reach_the_server(live, dataset_id, trained):
    # The module's worker offers one device (a CPU): eight on one machine is refused, naming the field.
    many = sbora(live, "jobs", "create", "--dataset", dataset_id, *TRAIN_ARGS, "--devices", "8", "--sharding", "full")
    assert many.returncode == 1 and "resources.devices" in many.stderr, many.stderr
    no_traceback(many)


def test_evals_create_watch_show_and_list(live, trained, tmp_path):
    _, adapter_id = trained
    items = [{"question": f"Which colour is item {i}?", "choices": ["red", "green", "blue", "gold"], "answer": i % 4}
             for i in range(12)]
    path = tmp_path / "colours-mc.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in items))
    dataset = sbora(live, "datasets", "upload", str(path)).stdout.strip()
    created = sbora(live, "evals", "create", "--dataset", dataset, "-c", TINY,
                    "-c", json.dumps({"model": adapter_id, "label": "tuned"}), "--watch", timeout=180)
    no_traceback(created)
    assert created.returncode == 0, created.stderr
    evaluation_id = re.search(r"evaluation (eval_\w+) queued", created.stderr).group(1)
    result = api_get(live, f"/evaluations/{evaluation_id}")["result"]
    accuracy = result["candidates"][1]["metrics"]["accuracy"]
    assert "tuned" in created.stdout and f"{accuracy['value']:.4f} [{accuracy['ci95'][0]:.4f}" in created.stdout
    assert "paired differences" in created.stdout
    assert evaluation_id in sbora(live, "evals", "list").stdout
    wrong = sbora(live, "evals", "show", evaluation_id, "--wrong", TINY)
    assert wrong.returncode == 0
    assert len([line for line in wrong.stdout.splitlines()[1:] if line.strip()]) == result["candidates"][0]["wrong"]
    refused = sbora(live, "evals", "create", "--dataset", dataset, "-c", "no-such-model")
    assert refused.returncode == 1 and "candidates[0].model" in refused.stderr
    no_traceback(refused)


def test_dpo_job_continues_an_adapter_from_the_command_line(live, trained, tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"Item {i}: which colour?", "chosen": " The colour is gold.",
                                         "rejected": f" The colour is grey {i}."}) + "\n" for i in range(8)))
    uploaded = sbora(live, "datasets", "upload", str(pairs))
    assert uploaded.returncode == 0, uploaded.stderr
    created = sbora(live, "jobs", "create", "--dataset", uploaded.stdout.strip(), "--model", TINY, "--objective", "dpo",
                    "--beta", "0.3", "--loss", "ipo", "--init-adapter", trained[1], "--max-steps", "2",
                    "--max-seq-len", "128", "--watch", timeout=180)
    assert created.returncode == 0, created.stderr
    job_id = re.search(r"job (job_\w+) queued", created.stderr).group(1)
    shown = json.loads(sbora(live, "jobs", "show", job_id, "--json").stdout)
    assert (shown["objective"], shown["beta"], shown["loss"], shown["init_adapter_id"]) == ("dpo", 0.3, "ipo", trained[1])
    assert shown["status"] == "succeeded" and shown["method"]["r"] == 4

    wrong = sbora(live, "jobs", "create", "--dataset", uploaded.stdout.strip(), "--model", TINY)
    assert wrong.returncode == 1 and "training_dataset_id" in wrong.stderr and "dpo" in wrong.stderr
    no_traceback(wrong)
