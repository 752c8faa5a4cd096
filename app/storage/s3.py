"""Artifacts in an S3-compatible object store (AWS S3, MinIO, Ceph, R2), through boto3.

Each object carries the sha256 of its bytes as metadata (`x-amz-meta-sha256`),
recorded at upload and checked on every download: an object altered in the
store is refused, never served. A PUT (and a completed multipart upload) is
atomic, so a crash mid-upload never leaves a partial object visible.

Reads go through a cache directory on this machine: an artifact is downloaded
once (verified, then renamed into place) and read from disk after that.
Artifacts are never rewritten under the same key, so the cache needs no
invalidation beyond deletes.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import urlparse

from app.storage.base import (
    StorageUnavailable,
    Stored,
    altered,
    check_key,
    check_prefix,
    copy_hashing,
    verified,
)
from sbora_core.method.files import sha256_file

CHUNK = 8 << 20  # multipart above this size, in parts of this size
_CREDENTIAL_ERRORS = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "InvalidToken",
                      "ExpiredToken", "AuthorizationHeaderMalformed"}
_MISSING = {"NoSuchKey", "404", "NotFound"}


def _answer(code: str, what: str) -> Exception:
    """The store's error for an S3 error code."""
    if code in _MISSING:
        return FileNotFoundError(f"no artifact {what}")
    if code in _CREDENTIAL_ERRORS:
        return StorageUnavailable(f"the object store refused our credentials ({code}); check "
                                  "SBORA_S3_ACCESS_KEY_ID and SBORA_S3_SECRET_ACCESS_KEY")
    if code == "NoSuchBucket":
        return StorageUnavailable(f"the object store has no bucket of that name ({what}); create it or "
                                  "fix SBORA_ARTIFACT_URL")
    return StorageUnavailable(f"the object store answered {code or 'an error'} for {what}")


@contextlib.contextmanager
def _translated(what: str) -> Iterator[None]:
    """boto3's errors as the store's: unreachable or refused → StorageUnavailable, absent → FileNotFoundError."""
    from boto3.exceptions import S3UploadFailedError
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        yield
    except ClientError as exc:
        raise _answer(str(exc.response.get("Error", {}).get("Code", "")), what) from exc
    except S3UploadFailedError as exc:  # the transfer manager wraps the ClientError it met
        cause = exc.__context__
        code = str(cause.response.get("Error", {}).get("Code", "")) if isinstance(cause, ClientError) else ""
        raise _answer(code, what) from exc
    except BotoCoreError as exc:  # connection refused, timeouts, DNS
        raise StorageUnavailable(f"the object store is unreachable ({type(exc).__name__})") from exc


class S3ArtifactStore:
    local_root: Path | None = None

    def __init__(self, url: str, cache_dir: Path, *, endpoint_url: str | None = None, region: str | None = None,
                 access_key_id: str | None = None, secret_access_key: str | None = None,
                 presign_expiry_s: int | None = None, public_endpoint_url: str | None = None) -> None:
        import boto3
        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config

        parsed = urlparse(url)
        if parsed.scheme != "s3" or not parsed.netloc:
            raise ValueError(f"SBORA_ARTIFACT_URL must look like s3://bucket/prefix, not {url!r}")
        self.bucket, self.prefix = parsed.netloc, parsed.path.strip("/")
        self.cache = cache_dir.resolve()
        self.cache.mkdir(parents=True, exist_ok=True)
        # Fail fast when the store is down: callers answer 503 rather than hold a request for minutes.
        config = Config(connect_timeout=5, read_timeout=60, retries={"max_attempts": 3, "mode": "standard"},
                        signature_version="s3v4")
        options: dict[str, Any] = {"endpoint_url": endpoint_url, "region_name": region or "us-east-1",
                                   "aws_access_key_id": access_key_id, "aws_secret_access_key": secret_access_key,
                                   "config": config}
        self.client = boto3.client("s3", **options)
        # Presigned URLs must name an address the client can reach, which may not be the one we use.
        self.presigner = (boto3.client("s3", **{**options, "endpoint_url": public_endpoint_url})
                          if presign_expiry_s and public_endpoint_url else self.client)
        self.presign_expiry_s = presign_expiry_s
        self.transfer = TransferConfig(multipart_threshold=CHUNK, multipart_chunksize=CHUNK)

    def _object(self, key: str) -> str:
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _cached(self, key: str) -> Path:
        return self.cache / check_key(key)

    def _upload(self, key: str, source: Path, sha256: str) -> None:
        with _translated(key):
            self.client.upload_file(str(source), self.bucket, self._object(key), Config=self.transfer,
                                    ExtraArgs={"Metadata": {"sha256": sha256}})

    def _keep_copy(self, key: str, source: Path) -> None:
        """An upload just spooled here is also the local copy: validating a dataset needs no download."""
        target = self._cached(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(source, target)

    def put_stream(self, key: str, stream: BinaryIO, limit: int | None = None) -> Stored:
        # Spooled to disk first: the size limit and the sha256 are known before anything is sent.
        incoming = self.cache / ".incoming"
        incoming.mkdir(exist_ok=True)
        tmp = incoming / secrets.token_hex(8)
        try:
            with open(tmp, "wb") as out:
                size, sha256 = copy_hashing(stream, out, limit)
            self._upload(key, tmp, sha256)
            self._keep_copy(key, tmp)
        finally:
            tmp.unlink(missing_ok=True)
        return Stored(key, size, sha256)

    def put_file(self, key: str, source: Path) -> Stored:
        # No local copy: the writer (a worker's checkpoints and adapters) does not read them back.
        sha256 = sha256_file(source)
        self._upload(key, source, sha256)
        return Stored(key, source.stat().st_size, sha256)

    def local_file(self, key: str, sha256: str | None = None, fresh: bool = False) -> Path:
        cached = self._cached(key)
        if cached.is_file() and not fresh:
            return verified(cached, sha256, key)
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_name(f".{cached.name}.{secrets.token_hex(4)}")
        try:
            with _translated(key):
                response = self.client.get_object(Bucket=self.bucket, Key=self._object(key))
                recorded = response.get("Metadata", {}).get("sha256")
                with contextlib.closing(response["Body"]) as body, open(tmp, "wb") as out:
                    _, got = copy_hashing(body, out)
            # An object copied in from elsewhere (a migrated store) carries no sha256: nothing to check
            # it against unless the database recorded one.
            expected = sha256 or recorded
            if expected is not None and got != expected:
                raise altered(key)
            os.replace(tmp, cached)
        finally:
            tmp.unlink(missing_ok=True)
        return cached

    def local_dir(self, prefix: str, names: tuple[str, ...]) -> Path:
        for name in names:
            self.local_file(f"{prefix}/{name}")
        return self._cached(prefix)

    def keys(self, prefix: str) -> list[str]:
        check_prefix(prefix)
        root = (f"{self.prefix}/{prefix}" if self.prefix else prefix) + "/"
        strip = len(self.prefix) + 1 if self.prefix else 0
        found: list[str] = []
        with _translated(prefix):
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=root):
                found.extend(item["Key"][strip:] for item in page.get("Contents", []))
        return sorted(found)

    def delete(self, key: str) -> None:
        doomed = [key, *self.keys(key)]
        with _translated(key):
            for start in range(0, len(doomed), 1000):  # the API's limit per request
                batch = [{"Key": self._object(k)} for k in doomed[start:start + 1000]]
                answer = self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})
                if answer.get("Errors"):
                    failed = answer["Errors"][0]
                    raise StorageUnavailable(f"the object store did not delete {len(answer['Errors'])} object(s) "
                                             f"under {key} ({failed.get('Code')}: {failed.get('Key')})")
        cached = self._cached(key)
        if cached.is_dir():
            shutil.rmtree(cached, ignore_errors=True)
        else:
            cached.unlink(missing_ok=True)

    def check(self) -> None:
        probe = self._object(f"probes/readyz-{os.getpid()}")
        with _translated("the readiness probe"):
            self.client.put_object(Bucket=self.bucket, Key=probe, Body=b"ok")
            self.client.delete_object(Bucket=self.bucket, Key=probe)

    def download_url(self, key: str, filename: str) -> str | None:
        if not self.presign_expiry_s:
            return None
        with _translated(key):
            return str(self.presigner.generate_presigned_url(
                "get_object", ExpiresIn=self.presign_expiry_s,
                Params={"Bucket": self.bucket, "Key": self._object(key),
                        "ResponseContentDisposition": f'attachment; filename="{filename}"'}))
