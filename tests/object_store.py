"""An S3-compatible object store for tests: moto's standalone server, a real HTTP server process
on a free port of 127.0.0.1 (not an in-process mock). Missing moto skips, or fails under
SBORA_REQUIRE_SERVICES=1 (.ci/run installs it with the dev dependencies)."""

from __future__ import annotations

import importlib.util
import json
import secrets
import subprocess
import sys
from pathlib import Path
from typing import Any

from stack import _port_open, free_port, missing_dependency, wait_for

ALLOW_S3 = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}


class ObjectStoreServer:
    """With `check_credentials` the server checks them, as a real store does: only the access key it
    issued on start (`key_id`, `secret`) is accepted. moto reads signatures from the Authorization
    header only, so presigned URLs (signed in the query string) need a server that does not check."""

    def __init__(self, workdir: Path, *, check_credentials: bool = True) -> None:
        if importlib.util.find_spec("moto") is None:
            missing_dependency("moto is not installed (pip install 'moto[server]'), so no S3 server can run")
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        env = {"PATH": "/usr/bin:/bin", "HOME": str(workdir)}
        if check_credentials:  # the three IAM calls below, creating the only user and key, go unchecked
            env["INITIAL_NO_AUTH_ACTION_COUNT"] = "3"
        self.log = open(workdir / f"s3-{self.port}.log", "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                     env=env, stdout=self.log, stderr=subprocess.STDOUT)
        wait_for(lambda: _port_open("127.0.0.1", self.port), 30, 0.1, "the S3 server to listen")
        self.key_id, self.secret = "unchecked", "unchecked"
        if not check_credentials:
            return
        iam = self.client("iam", "bootstrap", "bootstrap")
        iam.create_user(UserName="sbora")
        iam.put_user_policy(UserName="sbora", PolicyName="s3", PolicyDocument=json.dumps(ALLOW_S3))
        key = iam.create_access_key(UserName="sbora")["AccessKey"]
        self.key_id, self.secret = key["AccessKeyId"], key["SecretAccessKey"]

    def client(self, service: str = "s3", key_id: str | None = None, secret: str | None = None) -> Any:
        import boto3

        return boto3.client(service, endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id=key_id or self.key_id, aws_secret_access_key=secret or self.secret)

    def new_bucket(self) -> str:
        name = f"sbora-{secrets.token_hex(4)}"
        self.client().create_bucket(Bucket=name)
        return name

    def env(self, bucket: str, prefix: str = "artifacts") -> dict[str, str]:
        """The service's settings for a store in `bucket`."""
        return {"SBORA_ARTIFACT_URL": f"s3://{bucket}/{prefix}", "SBORA_S3_ENDPOINT_URL": self.endpoint,
                "SBORA_S3_REGION": "us-east-1", "SBORA_S3_ACCESS_KEY_ID": self.key_id,
                "SBORA_S3_SECRET_ACCESS_KEY": self.secret}

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()
