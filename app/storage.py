"""The artifact store: datasets, checkpoints and adapters, addressed by keys the service makes.

Keys are built from opaque ids (`datasets/ds_....jsonl`), never from anything
a user typed. Files are written under a temporary name and renamed, so a
half-written artifact is never visible, and every put returns the sha256.
`LocalArtifactStore` keeps them in a directory; a shared volume mounted on
every machine serves several workers.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from app.core.config import get_settings
from sbora_core.files import sha256_file

_KEY = re.compile(r"^[a-z]+(/[A-Za-z0-9_.-]+)+$")


@dataclass
class Stored:
    key: str
    size: int
    sha256: str


class UploadTooLarge(ValueError):
    pass


class LocalArtifactStore:
    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def local_path(self, key: str) -> Path:
        if not _KEY.match(key) or ".." in key.split("/"):
            raise ValueError(f"invalid artifact key {key!r}")
        return self.root / key

    def put_stream(self, key: str, stream: BinaryIO, limit: int | None = None) -> Stored:
        """Copy `stream` in chunks, hashing as it goes; UploadTooLarge past `limit` bytes."""
        target = self.local_path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}-{id(stream)}")
        digest, size = hashlib.sha256(), 0
        try:
            with open(tmp, "wb") as out:
                while chunk := stream.read(1 << 20):
                    size += len(chunk)
                    if limit is not None and size > limit:
                        raise UploadTooLarge(f"larger than the {limit} byte limit")
                    digest.update(chunk)
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
        return Stored(key, size, digest.hexdigest())

    def put_file(self, key: str, source: Path) -> Stored:
        with open(source, "rb") as handle:
            return self.put_stream(key, handle)

    def delete(self, key: str) -> None:
        path = self.local_path(key)
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


@functools.lru_cache(maxsize=1024)
def _sha256_of_version(path: Path, _mtime_ns: int, _size: int) -> str:
    return sha256_file(path)


def sha256_file_cached(path: Path) -> str:
    """sha256_file, computed once per version of the file (artifacts are replaced, never edited in place)."""
    stat = path.stat()
    return _sha256_of_version(path, stat.st_mtime_ns, stat.st_size)


def get_store() -> LocalArtifactStore:
    return LocalArtifactStore(get_settings().resolved_artifact_dir)
