"""The boto3 side of the S3 artifact store: the client, errors that name the setting to fix, multipart uploads.

Endpoint, credentials and region come from boto3's own chain (``AWS_ENDPOINT_URL`` or ``AWS_ENDPOINT_URL_S3``,
``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY`` or ``AWS_PROFILE``, ``AWS_DEFAULT_REGION``); maas adds no setting of
its own for them. boto3 is imported on first use.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from maas import envs
from maas.errors import InvalidInput, Unavailable

#: S3's smallest part (all but the last) and most parts in one multipart upload.
MIN_PART = 5 << 20
MAX_PARTS = 10_000
#: Parts of one upload sent at once.
PART_CONCURRENCY = 4
_CREDENTIALS = "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)"


class ArtifactStoreUnavailable(Unavailable):
    """The S3 store cannot be reached, refuses the credentials, or has no such bucket."""


@dataclass(frozen=True)
class Location:
    """``s3://bucket/prefix``: where the artifacts live in the bucket."""

    bucket: str
    prefix: str

    @classmethod
    def parse(cls, url: str) -> Location:
        rest = url.removeprefix("s3://")
        bucket, _, prefix = rest.partition("/")
        if not url.startswith("s3://") or not bucket:
            raise InvalidInput(f"MAAS_ARTIFACTS_URL={url!r} names no bucket; write it as s3://BUCKET/PREFIX")
        return cls(bucket, prefix.strip("/"))

    def key(self, hexdigest: str) -> str:
        return f"{self.base}{hexdigest[:2]}/{hexdigest}"

    @property
    def base(self) -> str:
        """The key prefix every artifact's key starts with."""
        return f"{self.prefix}/sha256/" if self.prefix else "sha256/"

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}".rstrip("/")


def make_client() -> Any:
    """An S3 client configured by boto3's standard settings, with path-style addressing off AWS (what MinIO,
    SeaweedFS and Ceph expect) and a few quick retries."""
    import boto3
    from botocore.config import Config

    session = boto3.session.Session()
    config = Config(retries={"max_attempts": 3, "mode": "standard"}, connect_timeout=10, read_timeout=120)
    client = session.client("s3", config=config)
    if "amazonaws.com" not in (client.meta.endpoint_url or ""):
        client = session.client("s3", config=config.merge(Config(s3={"addressing_style": "path"})))
    return client


def error_code(exc: BaseException) -> str:
    """The S3 error code of a botocore ``ClientError`` (``NoSuchKey``, ``404``, ``SignatureDoesNotMatch``…)."""
    response = getattr(exc, "response", None) or {}
    return str(response.get("Error", {}).get("Code", ""))


def is_missing(exc: BaseException) -> bool:
    return error_code(exc) in ("404", "NoSuchKey", "NotFound")


@contextlib.contextmanager
def translated(location: Location, endpoint: str | None) -> Iterator[None]:
    """Turn botocore's failures into :class:`ArtifactStoreUnavailable` naming what to set."""
    from botocore.exceptions import BotoCoreError, ClientError, EndpointConnectionError, NoCredentialsError

    where = f"the artifact store {location} (MAAS_ARTIFACTS_URL) at {endpoint or 'AWS S3'}"
    try:
        yield
    except NoCredentialsError:
        raise ArtifactStoreUnavailable(f"no S3 credentials for {where}; set {_CREDENTIALS}") from None
    except EndpointConnectionError:
        raise ArtifactStoreUnavailable(
            f"cannot connect to {where}; check AWS_ENDPOINT_URL and that the server is running"
        ) from None
    except ClientError as exc:
        code = error_code(exc)
        if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "403", "AccessDenied", "Forbidden"):
            raise ArtifactStoreUnavailable(
                f"{where} refused the credentials ({code}); check {_CREDENTIALS}, and that they may read, write, "
                f"list and delete under {location}"
            ) from None
        if code == "NoSuchBucket":
            raise ArtifactStoreUnavailable(
                f"bucket {location.bucket!r} does not exist at {endpoint or 'AWS S3'}; create it, or point "
                "MAAS_ARTIFACTS_URL at an existing one"
            ) from None
        raise ArtifactStoreUnavailable(f"{where} failed: {code or exc}") from None
    except BotoCoreError as exc:
        raise ArtifactStoreUnavailable(f"{where} failed: {exc}") from None


def upload(
    client: Any,
    location: Location,
    key: str,
    source: Path,
    metadata: dict[str, str],
    on_upload_id: Callable[[str], None],
) -> None:
    """Upload ``source`` to ``key``: one PUT, or a multipart upload above ``MAAS_S3_MULTIPART_THRESHOLD_MB``. Either
    way the object appears only once complete; a multipart upload that fails is aborted, and one whose process dies
    stays invisible (``on_upload_id`` records its id first, so ``maas gc`` can abort it)."""
    size = source.stat().st_size
    threshold = int(envs.MAAS_S3_MULTIPART_THRESHOLD_MB * (1 << 20))
    if size <= threshold:
        with source.open("rb") as body:
            client.put_object(Bucket=location.bucket, Key=key, Body=body, ContentLength=size, Metadata=metadata)
        return
    part = max(threshold, MIN_PART, -(-size // MAX_PARTS))
    upload_id = client.create_multipart_upload(Bucket=location.bucket, Key=key, Metadata=metadata)["UploadId"]
    try:
        on_upload_id(upload_id)
        delay = float(envs.MAAS_S3_PART_DELAY_S)
        fd = os.open(source, os.O_RDONLY)

        def send(number: int) -> dict[str, Any]:
            data = os.pread(fd, part, (number - 1) * part)
            etag = client.upload_part(
                Bucket=location.bucket, Key=key, UploadId=upload_id, PartNumber=number, Body=data
            )["ETag"]
            if delay:
                time.sleep(delay)  # a test hook: a window to kill the process mid-upload
            return {"ETag": etag, "PartNumber": number}

        try:
            with ThreadPoolExecutor(PART_CONCURRENCY, thread_name_prefix="maas-s3-part") as pool:
                parts = list(pool.map(send, range(1, -(-size // part) + 1)))
        finally:
            os.close(fd)
        client.complete_multipart_upload(
            Bucket=location.bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": parts}
        )
    except BaseException:
        with contextlib.suppress(Exception):  # the upload's own failure is the one to report
            abort(client, location, key, upload_id)
        raise


def abort(client: Any, location: Location, key: str, upload_id: str) -> None:
    """Abort a multipart upload (its parts are freed); one already gone is fine."""
    from botocore.exceptions import ClientError

    try:
        client.abort_multipart_upload(Bucket=location.bucket, Key=key, UploadId=upload_id)
    except ClientError as exc:
        if error_code(exc) not in ("NoSuchUpload", "404"):
            raise
