"""Artifacts as files in a directory on this machine (or a volume every machine mounts).

Files are written under a temporary name, flushed and renamed, so a half-written
artifact is never visible.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import BinaryIO

from app.storage.base import (
    StorageUnavailable,
    Stored,
    check_key,
    check_prefix,
    copy_hashing,
    verified,
)


class LocalArtifactStore:
    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:  # a read-only or missing volume: 503 and /readyz say so
            raise StorageUnavailable(f"cannot create {self.root.name}: {exc.strerror}") from exc
        self.local_root: Path | None = self.root

    def path(self, key: str) -> Path:
        return self.root / check_key(key)

    def put_stream(self, key: str, stream: BinaryIO, limit: int | None = None) -> Stored:
        target = self.path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}-{id(stream)}")
        try:
            with open(tmp, "wb") as out:
                size, sha256 = copy_hashing(stream, out, limit)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
        return Stored(key, size, sha256)

    def put_file(self, key: str, source: Path) -> Stored:
        with open(source, "rb") as handle:
            return self.put_stream(key, handle)

    def local_file(self, key: str, sha256: str | None = None, fresh: bool = False) -> Path:
        path = self.path(key)
        if not path.is_file():
            raise FileNotFoundError(f"no artifact {key}")
        return verified(path, sha256, key)

    def local_dir(self, prefix: str, names: tuple[str, ...]) -> Path:
        return self.path(prefix)

    def keys(self, prefix: str) -> list[str]:
        root = self.root / check_prefix(prefix)
        if not root.is_dir():
            return []
        return sorted(f"{prefix}/{p.relative_to(root).as_posix()}" for p in root.rglob("*")
                      if p.is_file() and not p.name.startswith("."))

    def delete(self, key: str) -> None:
        path = self.path(key)
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)

    def check(self) -> None:
        probe = self.root / ".readyz"
        try:
            probe.write_text("ok")
            probe.unlink()
        except OSError as exc:
            raise StorageUnavailable(f"not writable: {exc.strerror}") from exc

    def download_url(self, key: str, filename: str) -> str | None:
        return None
