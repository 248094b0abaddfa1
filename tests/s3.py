"""A real S3 endpoint for tests: moto's standalone server, run as its own process on a free port.

With `auth=True` the server checks signatures like AWS does: its first three requests (no auth)
create an IAM user allowed `s3:*` and that user's access key, which `env()` hands out; a wrong
secret then gets SignatureDoesNotMatch and an unknown key InvalidAccessKeyId. moto keeps every
bucket, object and user in memory, so `kill()` + `start()` on the same port brings back an empty
server: re-create the bucket (an authenticating server would also have forgotten its user, which
is why the fault tests use `auth=False`, where any credentials pass).
"""

from __future__ import annotations

import atexit
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from typing import Any

import boto3

REGION = "us-east-1"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class MotoServer:
    def __init__(self, *, auth: bool = True, port: int | None = None) -> None:
        self.auth = auth
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None
        self.key_id, self.secret = "testing", "testing"

    def start(self, timeout: float = 30.0) -> MotoServer:
        env = dict(os.environ)
        if self.auth:
            env["INITIAL_NO_AUTH_ACTION_COUNT"] = "3"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(f"{self.url}/moto-api/data.json", timeout=1):
                    break
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto server on port {self.port} did not start") from None
                time.sleep(0.1)
        if self.auth:
            self._make_user()
        return self

    def _make_user(self) -> None:
        iam = boto3.client(
            "iam",
            endpoint_url=self.url,
            region_name=REGION,
            aws_access_key_id="bootstrap",
            aws_secret_access_key="bootstrap",
        )
        iam.create_user(UserName="densealign")
        policy = {
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}],
        }
        iam.put_user_policy(UserName="densealign", PolicyName="s3", PolicyDocument=json.dumps(policy))
        key = iam.create_access_key(UserName="densealign")["AccessKey"]
        self.key_id, self.secret = key["AccessKeyId"], key["SecretAccessKey"]

    def kill(self) -> None:
        """SIGKILL, as a crashed or unplugged object store: no goodbye to open connections."""
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.kill()

    def env(self) -> dict[str, str]:
        """The standard AWS variables a DenseAlign process reads to reach this server."""
        return {
            "AWS_ENDPOINT_URL": self.url,
            "AWS_ACCESS_KEY_ID": self.key_id,
            "AWS_SECRET_ACCESS_KEY": self.secret,
            "AWS_DEFAULT_REGION": REGION,
            # nothing from the developer's ~/.aws may leak in
            "AWS_CONFIG_FILE": os.devnull,
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        }

    def client(self, **overrides: str) -> Any:
        return boto3.client(
            "s3",
            endpoint_url=self.url,
            region_name=REGION,
            aws_access_key_id=overrides.get("key_id", self.key_id),
            aws_secret_access_key=overrides.get("secret", self.secret),
        )

    def new_bucket(self) -> str:
        name = f"densealign-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name


_shared: MotoServer | None = None


def shared_server() -> MotoServer:
    """One authenticating server for the whole test run (each test makes its own bucket)."""
    global _shared
    if _shared is None:
        _shared = MotoServer(auth=True).start()
        atexit.register(_shared.stop)
    return _shared


def use_server(monkeypatch: Any, server: MotoServer) -> None:
    """Point this process's AWS variables at `server`, and drop any other AWS setting."""
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    for name, value in server.env().items():
        monkeypatch.setenv(name, value)
