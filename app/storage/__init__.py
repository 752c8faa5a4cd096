"""The artifact store: datasets, checkpoints and adapters, addressed by keys the service makes.

One setting picks it: `SBORA_ARTIFACT_URL=s3://bucket/prefix` keeps artifacts in an
S3-compatible object store (every machine reaches it, nothing else is shared);
without it they are files under `SBORA_ARTIFACT_DIR`.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

from app.core.config import get_settings
from app.storage.base import (
    ArtifactStore,
    StorageCorrupt,
    StorageUnavailable,
    Stored,
    UploadTooLarge,
    sha256_file_cached,
)
from app.storage.local import LocalArtifactStore

__all__ = ["ArtifactStore", "LocalArtifactStore", "StorageCorrupt", "StorageUnavailable", "Stored",
           "UploadTooLarge", "discard_quietly", "get_store", "sha256_file_cached"]

log = logging.getLogger(__name__)


def discard_quietly(store: ArtifactStore, key: str) -> None:
    """Delete what no row refers to any more: if the store cannot now, the objects are only space,
    left behind with a log line, and the delete the caller asked for still happened."""
    try:
        store.delete(key)
    except StorageUnavailable as exc:
        log.warning("left %s in the artifact store: %s", key, exc)


def get_store() -> ArtifactStore:
    settings = get_settings()
    if not settings.artifact_url:
        return LocalArtifactStore(settings.resolved_artifact_dir)
    secret = settings.s3_secret_access_key
    return _s3_store(settings.artifact_url, settings.resolved_scratch_dir / "artifact-cache",
                     settings.s3_endpoint_url, settings.s3_region, settings.s3_access_key_id,
                     secret.get_secret_value() if secret else None,
                     settings.s3_presign_expiry_s if settings.s3_presign_downloads else None,
                     settings.s3_public_endpoint_url)


@functools.lru_cache(maxsize=4)
def _s3_store(url: str, cache_dir: Path, endpoint_url: str | None, region: str | None, access_key_id: str | None,
              secret_access_key: str | None, presign_expiry_s: int | None,
              public_endpoint_url: str | None) -> ArtifactStore:
    # One per configuration: a boto3 client is slow to build and safe to share between threads.
    from app.storage.s3 import S3ArtifactStore

    return S3ArtifactStore(url, cache_dir, endpoint_url=endpoint_url, region=region, access_key_id=access_key_id,
                           secret_access_key=secret_access_key, presign_expiry_s=presign_expiry_s,
                           public_endpoint_url=public_endpoint_url)
