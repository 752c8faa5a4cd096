"""An S3-compatible object store for tests: moto's standalone server, a real HTTP server process
on a free port of 127.0.0.1 (not an in-process mock). Missing moto skips, or fails under
SBORA_REQUIRE_SERVICES=1 (.ci/run installs it with the dev dependencies)."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import secrets
import socket
import subprocess
import sys
import threading
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


class Relay:
    """A TCP relay in front of a server that can be cut: while down its port refuses connections and
    open ones are dropped, as when the store's host goes away; `up()` brings it back on the same port."""

    def __init__(self, target_port: int) -> None:
        self.target = target_port
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.listener: socket.socket | None = None
        self.open: list[socket.socket] = []
        self.up()

    def up(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self.listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def down(self) -> None:
        if self.listener is not None:
            self.listener.close()
            self.listener = None
        for conn in self.open:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()
        self.open.clear()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:  # closed by down()
                return
            server = socket.create_connection(("127.0.0.1", self.target))
            self.open += [client, server]
            for source, sink in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(1 << 16):
                sink.sendall(data)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)
