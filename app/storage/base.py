"""What every artifact store gives the service: keys, results and the errors callers handle."""

from __future__ import annotations

import functools
import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

from sbora_core.method.files import sha256_file

# Keys are built from opaque ids (`datasets/ds_....data`), never from anything a user typed.
_KEY = re.compile(r"^[a-z]+(/[A-Za-z0-9_.-]+)+$")
_PREFIX = re.compile(r"^[a-z]+(/[A-Za-z0-9_.-]+)*$")  # what `keys` may list: `jobs` as well as `jobs/j_1`


def check_key(key: str, pattern: re.Pattern[str] = _KEY) -> str:
    if not pattern.match(key) or ".." in key.split("/"):
        raise ValueError(f"invalid artifact key {key!r}")
    return key


def check_prefix(prefix: str) -> str:
    return check_key(prefix, _PREFIX)


@dataclass
class Stored:
    key: str
    size: int
    sha256: str


class UploadTooLarge(ValueError):
    pass


class StorageUnavailable(RuntimeError):
    """The store cannot be reached or refuses our credentials: retry later (HTTP 503, job code
    `storage_unavailable`)."""


class StorageCorrupt(RuntimeError):
    """An artifact's bytes do not match the sha256 recorded when it was stored; it is never served."""


class ArtifactStore(Protocol):
    """Datasets, checkpoints and adapters. A put is all or nothing: readers see the whole artifact
    or none of it. Reads hand back a file on this machine (a copy, for a remote store), checked
    against the sha256 recorded at put time."""

    #: The directory holding the artifacts when they are files on this machine (a job then writes
    #: its checkpoints straight into the store); None for a remote store.
    local_root: Path | None

    def put_stream(self, key: str, stream: BinaryIO, limit: int | None = None) -> Stored:
        """Copy `stream` in chunks, hashing as it goes; UploadTooLarge past `limit` bytes."""
        ...

    def put_file(self, key: str, source: Path) -> Stored: ...

    def local_file(self, key: str, sha256: str | None = None, fresh: bool = False) -> Path:
        """The artifact as a file here; StorageCorrupt if its bytes are not the ones stored (or not
        `sha256`), FileNotFoundError if there is none. `fresh` reads the store itself, not a copy
        made earlier (for keys that are written again: a job's checkpoints)."""
        ...

    def local_dir(self, prefix: str, names: tuple[str, ...]) -> Path:
        """A directory here holding the files `names` stored under `prefix`."""
        ...

    def keys(self, prefix: str) -> list[str]:
        """Every key under `prefix/`, sorted."""
        ...

    def delete(self, key: str) -> None:
        """The artifact `key`, or everything under the prefix `key`; absent is fine."""
        ...

    def check(self) -> None:
        """StorageUnavailable (saying why) unless the store can be written now."""
        ...

    def download_url(self, key: str, filename: str) -> str | None:
        """A URL the client may fetch the artifact from directly, or None to stream it through the API."""
        ...


@functools.lru_cache(maxsize=1024)
def _sha256_of_version(path: Path, _mtime_ns: int, _size: int) -> str:
    return sha256_file(path)


def sha256_file_cached(path: Path) -> str:
    """sha256_file, computed once per version of the file (artifacts are replaced, never edited in place)."""
    stat = path.stat()
    return _sha256_of_version(path, stat.st_mtime_ns, stat.st_size)


def copy_hashing(source: BinaryIO, out: BinaryIO, limit: int | None = None) -> tuple[int, str]:
    """Copy in 1 MiB chunks; the size and sha256 of what was copied. UploadTooLarge past `limit` bytes."""
    digest, size = hashlib.sha256(), 0
    while chunk := source.read(1 << 20):
        size += len(chunk)
        if limit is not None and size > limit:
            raise UploadTooLarge(f"larger than the {limit} byte limit")
        digest.update(chunk)
        out.write(chunk)
    return size, digest.hexdigest()


def altered(key: str) -> StorageCorrupt:
    return StorageCorrupt(f"artifact {key} does not match its recorded sha256; it was altered in the store "
                          "and is not served")


def verified(path: Path, sha256: str | None, key: str) -> Path:
    if sha256 is not None and sha256_file_cached(path) != sha256:
        raise altered(key)
    return path
