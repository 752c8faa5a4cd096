"""The S3 artifact store against a real S3-compatible server process: streamed and multipart
uploads, sha256 recorded and checked on read, nothing visible after a failed upload, prefix deletes,
and clear errors for an unreachable store and refused credentials."""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import pytest
from object_store import ObjectStoreServer
from stack import free_port

from app.storage import StorageCorrupt, StorageUnavailable, UploadTooLarge
from app.storage.s3 import CHUNK, S3ArtifactStore


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    server = ObjectStoreServer(tmp_path_factory.mktemp("s3"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def presigning_server(tmp_path_factory):
    server = ObjectStoreServer(tmp_path_factory.mktemp("s3-presign"), check_credentials=False)
    yield server
    server.stop()


def store_on(server: ObjectStoreServer, bucket: str, cache, **overrides) -> S3ArtifactStore:
    options = {"endpoint_url": server.endpoint, "region": "us-east-1", "access_key_id": server.key_id,
               "secret_access_key": server.secret, **overrides}
    return S3ArtifactStore(f"s3://{bucket}/under/here", cache, **options)


@pytest.fixture
def bucket(server):
    return server.new_bucket()


def test_an_upload_records_its_sha256_and_another_machine_reads_it_back_verified(server, bucket, tmp_path):
    here, there = store_on(server, bucket, tmp_path / "a"), store_on(server, bucket, tmp_path / "b")
    payload = os.urandom(CHUNK + 123_456)  # above the multipart threshold
    stored = here.put_stream("datasets/ds_1.data", io.BytesIO(payload))
    assert stored.size == len(payload) and stored.sha256 == hashlib.sha256(payload).hexdigest()

    head = server.client().head_object(Bucket=bucket, Key="under/here/datasets/ds_1.data")
    assert head["Metadata"]["sha256"] == stored.sha256
    assert head["ETag"].strip('"').endswith("-2"), "a file over the threshold goes up in parts"
    copy = there.local_file("datasets/ds_1.data", stored.sha256)
    assert copy.read_bytes() == payload and copy.is_relative_to(tmp_path / "b")
    assert there.keys("datasets") == ["datasets/ds_1.data"]


def test_an_upload_over_the_limit_leaves_nothing_behind(server, bucket, tmp_path):
    store = store_on(server, bucket, tmp_path)
    with pytest.raises(UploadTooLarge):
        store.put_stream("datasets/ds_big.data", io.BytesIO(b"x" * 5000), limit=4096)
    assert "Contents" not in server.client().list_objects_v2(Bucket=bucket)
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]


def test_an_object_altered_in_the_store_is_refused(server, bucket, tmp_path):
    store = store_on(server, bucket, tmp_path / "writer")
    stored = store.put_stream("adapters/ad_1/adapter_model.safetensors", io.BytesIO(b"the real weights"))
    # Someone rewrites the bytes in the bucket and keeps the recorded sha256.
    server.client().put_object(Bucket=bucket, Key="under/here/adapters/ad_1/adapter_model.safetensors",
                               Body=b"other weights!!!", Metadata={"sha256": stored.sha256})
    reader = store_on(server, bucket, tmp_path / "reader")
    with pytest.raises(StorageCorrupt, match="does not match its recorded sha256"):
        reader.local_file("adapters/ad_1/adapter_model.safetensors")
    with pytest.raises(StorageCorrupt):
        reader.local_file("adapters/ad_1/adapter_model.safetensors", stored.sha256)
    assert not (tmp_path / "reader" / "adapters" / "ad_1" / "adapter_model.safetensors").exists()


def test_a_missing_object_is_file_not_found(server, bucket, tmp_path):
    with pytest.raises(FileNotFoundError):
        store_on(server, bucket, tmp_path).local_file("datasets/ds_gone.data")


def test_deleting_a_prefix_removes_every_object_and_copy_under_it(server, bucket, tmp_path):
    store = store_on(server, bucket, tmp_path)
    for name in ("adapter_config.json", "adapter_model.safetensors", "sparse.zip"):
        store.put_stream(f"adapters/ad_2/{name}", io.BytesIO(name.encode()))
    store.put_stream("adapters/ad_3/sparse.zip", io.BytesIO(b"keep me"))
    assert len(store.keys("adapters/ad_2")) == 3
    store.delete("adapters/ad_2")
    assert store.keys("adapters/ad_2") == [] and not (tmp_path / "adapters" / "ad_2").exists()
    assert store.keys("adapters/ad_3") == ["adapters/ad_3/sparse.zip"]


def test_a_directory_of_named_files_comes_down_together(server, bucket, tmp_path):
    store_on(server, bucket, tmp_path / "w").put_stream("adapters/ad_4/a.json", io.BytesIO(b"{}"))
    store_on(server, bucket, tmp_path / "w").put_stream("adapters/ad_4/big.zip", io.BytesIO(b"z" * 1000))
    directory = store_on(server, bucket, tmp_path / "r").local_dir("adapters/ad_4", ("a.json",))
    assert sorted(p.name for p in directory.iterdir()) == ["a.json"], "only the files asked for are fetched"


def test_an_unreachable_store_says_so(tmp_path):
    store = S3ArtifactStore("s3://sbora-nowhere/x", tmp_path, endpoint_url=f"http://127.0.0.1:{free_port()}",
                            access_key_id="k", secret_access_key="s")
    with pytest.raises(StorageUnavailable, match="unreachable"):
        store.check()
    with pytest.raises(StorageUnavailable):
        store.put_stream("datasets/ds_5.data", io.BytesIO(b"data"))
    assert not [p for p in tmp_path.rglob("*") if p.is_file()], "a failed upload keeps no local copy"


def test_refused_credentials_and_a_missing_bucket_say_what_to_fix(server, bucket, tmp_path):
    for upload in (lambda s: s.put_stream("datasets/ds_7.data", io.BytesIO(b"data")),
                   lambda s: s.put_file("datasets/ds_8.data", Path(__file__))):  # the transfer manager's path
        with pytest.raises(StorageUnavailable, match="refused our credentials"):
            upload(store_on(server, bucket, tmp_path, secret_access_key="not-the-secret"))
    with pytest.raises(StorageUnavailable, match="SBORA_S3_ACCESS_KEY_ID"):
        store_on(server, bucket, tmp_path, access_key_id="AKIAWRONGWRONGWRONG1").check()
    with pytest.raises(StorageUnavailable, match="SBORA_S3_SECRET_ACCESS_KEY"):
        store_on(server, bucket, tmp_path, secret_access_key="not-the-secret").check()
    with pytest.raises(StorageUnavailable, match="no bucket"):
        store_on(server, "sbora-never-made", tmp_path).check()


def test_presigned_urls_fetch_the_object_without_credentials(presigning_server, tmp_path):
    import httpx

    server, bucket = presigning_server, presigning_server.new_bucket()
    store = store_on(server, bucket, tmp_path, presign_expiry_s=60)
    store.put_stream("adapters/ad_6/sparse.zip", io.BytesIO(b"zip bytes"))
    url = store.download_url("adapters/ad_6/sparse.zip", "ad_6.zip")
    assert url is not None and url.startswith(server.endpoint)
    response = httpx.get(url)
    assert response.status_code == 200 and response.content == b"zip bytes"
    assert 'filename="ad_6.zip"' in response.headers["content-disposition"]
    assert store_on(server, bucket, tmp_path).download_url("adapters/ad_6/sparse.zip", "x.zip") is None
