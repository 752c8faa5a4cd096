"""One source of truth for a job's settings: sbora_core's dataclasses.

`POST /jobs`, the CLI's job files and the OpenAI mapping take their fields and
defaults from `SBoRAConfig` and `Hyperparameters`, so a job that leaves every
setting out trains the same adapter whichever way it comes in.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import zipfile
from dataclasses import asdict, fields

import torch
import yaml
from fastapi.testclient import TestClient
from stack import chat_lines, embedded_stack_with_worker, wait_for

from app.openai_schemas import FineTuningJobCreate
from app.schemas import HyperparametersSpec, MethodSpec, ResourcesSpec
from app.services.fine_tuning import to_job_create
from sbora_core.method.adapter_io import load_adapter
from sbora_core.method.config import USER_FIELDS, SBoRAConfig
from sbora_core.training.job import Hyperparameters, Resources


def test_request_models_take_fields_and_defaults_from_the_core():
    core_method = SBoRAConfig()
    assert set(MethodSpec.model_fields) == set(USER_FIELDS)
    assert MethodSpec().model_dump() == {name: getattr(core_method, name) for name in USER_FIELDS}
    assert set(HyperparametersSpec.model_fields) == {f.name for f in fields(Hyperparameters)}
    assert HyperparametersSpec().model_dump() == asdict(Hyperparameters())
    assert ResourcesSpec().model_dump() == asdict(Resources())
    # The help text travels too (it documents /docs).
    assert MethodSpec.model_fields["r"].description == SBoRAConfig.__dataclass_fields__["r"].metadata["help"]


def test_an_openai_request_with_auto_settings_maps_to_the_defaults():
    spec = to_job_create(FineTuningJobCreate(model="tiny-llama", training_file="ds_" + "0" * 24))
    assert spec.method == MethodSpec() and spec.hyperparameters == HyperparametersSpec()


def factors(adapter) -> dict[str, torch.Tensor]:
    return {f"{n}.{k}": t for n, d in adapter.modules.items() for k, t in d.factors().items()}


def test_a_job_with_every_setting_left_out_trains_identically_through_the_cli_and_the_api(tmp_path, tiny_model_dir):
    data = tmp_path / "train.jsonl"
    data.write_bytes(chat_lines(16))

    # Through the CLI: a job file naming only the model, the data and where to write.
    job_file = tmp_path / "job.yaml"
    job_file.write_text(yaml.safe_dump({"base_model": str(tiny_model_dir), "train_file": str(data),
                                        "output_dir": str(tmp_path / "cli-run")}))
    # One torch thread, as the worker below uses: the same arithmetic in the same order.
    done = subprocess.run([sys.executable, "-m", "sbora_cli.main", "train", "-c", str(job_file)],
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    from_cli = load_adapter(done.stdout.strip().splitlines()[-1])

    # Through the API: a job naming only the model and the dataset.
    with embedded_stack_with_worker(tmp_path / "stack", tiny_model_dir, {"SBORA_TORCH_THREADS": "1"}) as stack:
        headers = {"Authorization": f"Bearer {stack.key('alice')}"}
        from app.main import create_app

        with TestClient(create_app()) as client:
            dataset = client.post("/datasets", headers=headers, files={"file": ("t.jsonl", data.read_bytes())}).json()
            job = client.post("/jobs", headers=headers, json={"base_model": "tiny-llama",
                                                              "training_dataset_id": dataset["id"]}).json()
            finished = wait_for(lambda: (j := client.get(f"/jobs/{job['id']}", headers=headers).json())["status"]
                                in ("succeeded", "failed") and j, 300, 0.5, "the job")
            assert finished["status"] == "succeeded", finished["error"]
            archive = client.get(f"/adapters/{finished['adapter_id']}", headers=headers).content
    zipfile.ZipFile(io.BytesIO(archive)).extractall(tmp_path / "api-adapter")
    from_api = load_adapter(tmp_path / "api-adapter")

    assert from_api.config == from_cli.config  # the same variant, rank, alpha, dropout, targets and base
    assert from_api.metadata["hyperparameters"] == from_cli.metadata["hyperparameters"] == asdict(Hyperparameters())
    assert finished["method"] == MethodSpec().model_dump()
    # The adapter says what it was trained on (the GPU's name on a GPU worker).
    expected_device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    assert from_api.metadata["device_name"].startswith(expected_device)
    cli_factors, api_factors = factors(from_cli), factors(from_api)
    assert cli_factors.keys() == api_factors.keys()
    for name, value in cli_factors.items():
        if torch.cuda.is_available():  # CUDA's atomic adds (index_add_, scatter) may reorder sums
            torch.testing.assert_close(value, api_factors[name], rtol=1e-3, atol=1e-5)
        else:
            assert torch.equal(value, api_factors[name]), name
    assert any(bool(v.abs().sum() > 0) for v in api_factors.values())  # it trained
