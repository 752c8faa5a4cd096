"""The production compose file: well-formed, and validated by `docker compose config` where the client has compose."""

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

COMPOSE = Path(__file__).resolve().parents[2] / "docker" / "compose.yaml"


def test_compose_has_the_production_shape():
    spec = yaml.safe_load(COMPOSE.read_text())
    services = spec["services"]
    assert {"postgres", "redis", "minio", "api", "worker-gpu0"} <= set(services)
    worker, api = services["worker-gpu0"], services["api"]
    for env in (worker["environment"], api["environment"]):
        assert env["SBORA_BROKER_URL"].startswith("redis://")
        assert env["SBORA_DATABASE_URL"].startswith("postgresql+psycopg://")
        assert env["SBORA_ARTIFACT_URL"].startswith("s3://") and env["SBORA_S3_ENDPOINT_URL"] == "http://minio:9000"
    assert worker["environment"]["CUDA_VISIBLE_DEVICES"] == "0"
    # The object store is shared; no volume is, so the API and workers may run on different machines.
    assert not set(api["volumes"]) & set(worker["volumes"])
    bucket = api["environment"]["SBORA_ARTIFACT_URL"].removeprefix("s3://").split("/")[0]
    assert f"local/{bucket}" in " ".join(services["minio-bucket"]["entrypoint"])
    for dockerfile in ("Dockerfile.api", "Dockerfile.worker"):
        assert (COMPOSE.parent / dockerfile).is_file()


def test_docker_compose_config_accepts_it():
    docker = shutil.which("docker")
    if docker is None or subprocess.run([docker, "compose", "version"], capture_output=True).returncode != 0:
        pytest.skip("the docker client here has no compose plugin")
    result = subprocess.run([docker, "compose", "-f", str(COMPOSE), "config", "--quiet"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
