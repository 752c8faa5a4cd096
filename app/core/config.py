"""All service settings, read from `SBORA_*` environment variables (or a `.env` file).

The API, the Celery workers and Alembic read this one object. Defaults give a
self-contained single machine: a SQLite file, a filesystem broker and an
artifact directory, all under `SBORA_DATA_DIR`.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SBORA_", env_file=".env", extra="ignore")

    data_dir: Path = Field(Path("data"), description="where the default database, broker and artifacts live")
    database_url: str | None = Field(None, description="SQLAlchemy URL; default: SQLite file in data_dir")
    broker_url: str | None = Field(None, description="Celery broker URL; default: filesystem broker in data_dir")
    artifact_dir: Path | None = Field(None, description="artifact store root; default: data_dir/artifacts")
    artifact_url: str | None = Field(None, description="s3://bucket/prefix: keep artifacts in an S3-compatible "
                                                       "object store instead of artifact_dir")
    s3_endpoint_url: str | None = Field(None, description="the object store's address (MinIO, Ceph, R2); "
                                                          "default: AWS S3")
    s3_region: str | None = Field(None, description="the bucket's region; default us-east-1")
    s3_access_key_id: str | None = Field(None, description="default: boto3's usual sources (AWS_* variables, "
                                                           "instance role)")
    s3_secret_access_key: SecretStr | None = Field(None, description="the secret of s3_access_key_id")
    s3_presign_downloads: bool = Field(False, description="GET /adapters/{id} redirects to a presigned URL "
                                                          "instead of streaming through the API")
    s3_presign_expiry_s: int = Field(900, ge=1, description="how long a presigned download URL stays valid")
    s3_public_endpoint_url: str | None = Field(None, description="the object store's address as clients reach "
                                                                 "it, for presigned URLs; default s3_endpoint_url")
    scratch_dir: Path | None = Field(None, description="this machine's own working space: a job's files while it "
                                                       "trains and the copies of remote artifacts; "
                                                       "default: data_dir/scratch")
    models: list[str] = Field(
        ["smollm2-135m-instruct"],
        description="base models offered to users: known names or local model directories (JSON list)",
    )
    model_cache: Path | None = Field(None, description="where converted and downloaded base models are kept; "
                                                       "default ~/.cache/sbora/models")
    max_upload_bytes: int = Field(100 * 1024 * 1024, description="largest dataset upload accepted")
    min_dataset_records: int = Field(1, description="fewest valid records a dataset may have")
    job_lease_s: int = Field(120, description="a running job whose worker is silent this long is taken over")
    generate_max_new_tokens: int = Field(1024, description="upper bound on max_new_tokens per request")
    engine_max_batch_size: int = Field(16, description="requests decoded together in one batch")
    engine_max_queue: int = Field(64, description="requests waiting for generation before 429")
    engine_max_prompt_tokens: int = Field(0, ge=0, description="prompt tokens one generation request may have "
                                          "(413 beyond); 0: only the model's context bounds it")
    engine_max_tenant_prompt_tokens: int = Field(65536, ge=0, description="prompt tokens of one tenant's "
                                                 "generation requests queued and running together (429 beyond, "
                                                 "413 for one request larger than it); 0: no bound")
    request_timeout_s: float = Field(300.0, gt=0, description="a generation request still running after this "
                                     "long is cancelled: 504, or an error event in a stream")
    max_body_bytes: int = Field(64 * 1024 * 1024, ge=1024, description="largest request body other than a "
                                "dataset upload (413 beyond, before it is parsed)")
    engine_warm_start: bool = Field(True, description="load every offered model into the generation engine when "
                                                      "the API starts (/readyz waits for it), not on first use")
    adapter_cache_bytes: int = Field(1 << 30, description="bytes of adapters kept loaded per base model (LRU), "
                                     "and as many again of the base regions their merges replace")
    torch_threads: int = Field(0, ge=0, description="CPU threads torch uses in each worker and in the generation "
                                                   "engine; 0: half the cores each")
    worker_nice: int = Field(10, ge=0, le=19, description="nice value of training processes: on a shared "
                                                          "machine the API and the engine answer first")
    host: str = Field("127.0.0.1", description="address `sbora serve` binds")
    port: int = Field(8000, description="port `sbora serve` binds")
    train_queue: str = Field("train", description="Celery queue training jobs go to")
    reconcile_interval_s: float = Field(5.0, description="how often the API looks for jobs to send again: "
                                                         "a dead worker's, or one whose message was lost")
    queued_stale_s: float = Field(60.0, description="a queued job that an idle live worker has not taken "
                                                    "for this long lost its message and is sent again")
    worker_heartbeat_s: float = Field(2.0, description="how often a worker says it is alive; three missed "
                                                       "beats and its jobs are taken over")
    worker_devices: int = Field(0, ge=0, description="devices a worker offers one job (its ranks): 0 = every GPU "
                                                    "it sees, or 1 on a CPU-only machine")
    worker_address: str | None = Field(None, description="the address workers on other machines reach this one at, "
                                                         "for jobs spanning machines; default: its host name")
    distributed_step_timeout_s: float = Field(60.0, gt=0, description="a training collective of a job on several "
                                              "ranks waits this long for a silent peer before the job stops")
    distributed_setup_timeout_s: float = Field(900.0, gt=0, description="how long the ranks of a job wait for "
                                               "each other while they load the base model")
    gang_timeout_s: float = Field(60.0, gt=0, description="a job spanning several machines waits this long for "
                                                          "workers to fill its gang, then goes back to queued")
    storage_retry_s: float = Field(1800.0, description="a job stopped by an unreachable artifact store is queued "
                                                       "again and retried this long before it fails with "
                                                       "storage_unavailable")
    max_concurrent_jobs: int = Field(4, description="per tenant: queued plus running jobs (429 beyond)")
    max_stored_bytes: int = Field(10 * 1024**3, description="per tenant: datasets plus adapters (413 beyond)")
    log_format: Literal["json", "text"] = Field("json", description="log lines as JSON objects, or plain text")
    log_level: str = Field("INFO", description="lowest level logged (DEBUG, INFO, WARNING, ...)")

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.data_dir / 'sbora.db').resolve()}"

    @property
    def resolved_broker_url(self) -> str:
        return self.broker_url or "filesystem://"

    @property
    def resolved_torch_threads(self) -> int:
        # The worker and the engine share the machine with each other and with the API: torch's
        # default (every core each, OpenMP threads spinning while they wait) starves the API.
        return self.torch_threads or max(1, (os.cpu_count() or 2) // 2)

    @property
    def broker_folder(self) -> Path:
        return (self.data_dir / "broker").resolve()

    @property
    def resolved_scratch_dir(self) -> Path:
        return (self.scratch_dir or self.data_dir / "scratch").resolve()

    @property
    def resolved_artifact_dir(self) -> Path:
        return (self.artifact_dir or self.data_dir / "artifacts").resolve()


@lru_cache
def get_settings() -> Settings:
    return Settings()
