"""S3-compatible object storage (MinIO, Ceph RGW, AWS S3) for run folders, models and datasets.

Credentials come only from the standard AWS environment variables or profile, never from the spec. Every
request retries with backoff (botocore "standard" mode); uploads above 64 MiB go multipart. A transient outage
slows a run down; a lasting one ends in one `StorageError` that names the endpoint.
"""
from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

from tunerun.cluster.storage import HashingReader, HashingWriter, cache_root
from tunerun.jobs.errors import StorageError
from tunerun.jobs.spec import StorageSpec

# Standard-mode retries back off exponentially (capped at 20 s): 8 attempts ride out a restart of the store.
MAX_ATTEMPTS = int(os.environ.get("AWS_MAX_ATTEMPTS", 8))
CONNECT_TIMEOUT_S = 5
READ_TIMEOUT_S = 20
APPEND_FLUSH_S = 2.0  # how stale a buffered metrics/events object may get on the store
CREDENTIAL_VARIABLES = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
DOWNLOAD_ATTEMPTS = 5  # of a body cut off midway, as s3transfer's num_download_attempts
MAX_POOL_CONNECTIONS = 64  # botocore's 10 would be shared by the server's 40 request threads


def split_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` → ("bucket", "a/b")."""
    parsed = urlparse(uri)
    return parsed.netloc, parsed.path.strip("/")


def missing_credentials() -> list[str]:
    """The AWS variables a job needs but this environment lacks ([] when a profile or variables provide them)."""
    if os.environ.get("AWS_PROFILE") or Path(os.path.expanduser("~/.aws/credentials")).is_file():
        return []
    return [name for name in CREDENTIAL_VARIABLES if not os.environ.get(name)]


# What else decides how a client authenticates and connects: a client made under other values is another client.
CLIENT_ENVIRONMENT = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
                      "AWS_DEFAULT_REGION", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE", "AWS_CA_BUNDLE",
                      "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3")
_clients: dict[tuple, object] = {}
_clients_lock = threading.Lock()


def client(storage: StorageSpec, signed_payload: bool = True):
    """The boto3 client for ``storage``, one per process and settings: making one costs milliseconds and a
    credential lookup, and a server opens run folders by the thousand. boto3 clients are thread-safe (its
    sessions are not: clients are made under a lock); a forked child makes its own.

    ``signed_payload=False``: the client for checkpoint bytes (`S3Backend.upload_hashed`). SigV4 otherwise hashes
    every request body with sha256 on plain HTTP, or without a checksum header, which on top of the manifest's
    sha256 hashes each byte twice; those bytes are vouched for end to end by the manifest (itself a signed write)
    and verified on every restore, so their requests carry UNSIGNED-PAYLOAD while their headers stay signed."""
    key = (*_settings_key(storage), signed_payload)
    with _clients_lock:
        if key not in _clients:
            if len(_clients) >= 32:  # settings that change (rotated credentials) must not grow this forever
                _clients.pop(next(iter(_clients)))
            _clients[key] = _new_client(storage) if signed_payload else _new_client(storage, signed_payload=False)
        return _clients[key]


def _settings_key(storage: StorageSpec) -> tuple:
    return (os.getpid(), storage.endpoint_url, storage.region, storage.addressing_style, storage.checksum_mode,
            storage.ca_bundle, storage.verify_tls, MAX_ATTEMPTS, CONNECT_TIMEOUT_S, READ_TIMEOUT_S,
            *(os.environ.get(name) for name in CLIENT_ENVIRONMENT))


def _new_client(storage: StorageSpec, signed_payload: bool = True):
    import boto3
    from botocore.config import Config

    config = Config(
        region_name=storage.region or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
        retries={"max_attempts": MAX_ATTEMPTS, "mode": "standard"},
        connect_timeout=CONNECT_TIMEOUT_S,
        read_timeout=READ_TIMEOUT_S,
        max_pool_connections=MAX_POOL_CONNECTIONS,  # one client serves every thread of a server
        s3={"addressing_style": storage.addressing_style,
            **({} if signed_payload else {"payload_signing_enabled": False})},
        request_checksum_calculation=storage.checksum_mode,
        response_checksum_validation=storage.checksum_mode,
    )
    verify = storage.ca_bundle or storage.verify_tls
    return boto3.client("s3", endpoint_url=storage.endpoint_url, config=config, verify=verify)


def explain(exc: Exception, storage: StorageSpec, what: str) -> StorageError:
    """One actionable message for the ways talking to an object store goes wrong."""
    from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError, ReadTimeoutError, SSLError

    where = f"{storage.uri}" + (f" at {storage.endpoint_url}" if storage.endpoint_url else "")
    if isinstance(exc, SSLError):  # on-prem stores commonly present certificates of the company's own CA
        trusted = f"the CA in {storage.ca_bundle}" if storage.ca_bundle else "the system's CAs"
        return StorageError(f"{what} {where}: its TLS certificate is not signed by {trusted} ({exc}); set "
                            "storage.ca_bundle to the PEM file of the CA that signed it (or storage.verify_tls: "
                            "false on a network you trust)")
    if isinstance(exc, NoCredentialsError):
        return StorageError(f"{what} {where}: no S3 credentials; set AWS_ACCESS_KEY_ID and "
                            "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) in the environment that submits the job")
    if isinstance(exc, (EndpointConnectionError, ReadTimeoutError)) or "Connect timeout" in str(exc):
        return StorageError(f"{what} {where}: the endpoint did not answer after {MAX_ATTEMPTS} attempts "
                            f"({type(exc).__name__}); check storage.endpoint_url and that the server is up")
    if isinstance(exc, ClientError):
        code = exc.response.get("Error", {}).get("Code", "")
        if code in ("NoSuchBucket", "404"):
            return StorageError(f"{what} {where}: bucket '{split_uri(storage.uri)[0]}' does not exist; "
                                "create it first (e.g. `mc mb` for MinIO)")
        if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403", "InvalidToken"):
            return StorageError(f"{what} {where}: the store refused the credentials ({code}); check "
                                "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY and the bucket policy")
        return StorageError(f"{what} {where}: {code or exc}")
    return StorageError(f"{what} {where}: {type(exc).__name__}: {exc}")


def check_access(storage: StorageSpec) -> None:
    """Before anything starts: the bucket exists, the credentials work, and we may write under the prefix."""
    missing = missing_credentials()
    if missing:
        raise StorageError(f"storage {storage.uri}: missing {', '.join(missing)} in the environment "
                           "(credentials never go into the job spec)")
    bucket, prefix = split_uri(storage.uri)
    s3 = client(storage)
    probe = f"{prefix}/.tunerun-write-check" if prefix else ".tunerun-write-check"
    try:
        s3.head_bucket(Bucket=bucket)
        s3.put_object(Bucket=bucket, Key=probe, Body=b"ok")
        s3.delete_object(Bucket=bucket, Key=probe)
    except Exception as exc:  # noqa: BLE001 - translated into one message
        raise explain(exc, storage, "storage") from None


class S3Backend:
    """Run-folder keys below ``s3://bucket/prefix/``.

    Object stores have no append: appended lines (metrics, events) are buffered and the object is rewritten
    at most every APPEND_FLUSH_S seconds and on flush(). One process appends to a given object at a time
    (the driver before and after training, rank 0 during it), and each flushes before handing over.
    """

    def __init__(self, storage: StorageSpec):
        self.storage = storage
        self.bucket, self.prefix = split_uri(storage.uri)
        self.s3 = client(storage)
        self._pending: dict[str, list[bytes]] = {}
        self._last_flush = 0.0
        self._lock = threading.Lock()

    def _full(self, key: str) -> str:
        return f"{self.prefix}/{key}".strip("/") if self.prefix else key

    def uri(self, key: str = "") -> str:
        return f"s3://{self.bucket}/{self._full(key)}".rstrip("/")

    def _call(self, what: str, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - every failure becomes one StorageError
            from botocore.exceptions import ClientError

            if isinstance(exc, ClientError) and exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                raise FileNotFoundError(what) from None
            raise explain(exc, self.storage, what) from None

    def get(self, key: str) -> bytes:
        pending = b"".join(self._pending.get(key, []))
        try:
            body = self._call(f"read {key} from", self.s3.get_object, Bucket=self.bucket, Key=self._full(key))
            return body["Body"].read() + pending
        except FileNotFoundError:
            if pending:
                return pending
            raise

    def put(self, key: str, data: bytes) -> None:
        self._call(f"write {key} to", self.s3.put_object, Bucket=self.bucket, Key=self._full(key), Body=data)

    def put_new(self, key: str, data: bytes) -> bool:
        """Write ``key`` only if nothing is there (S3 conditional write, ``If-None-Match: *``); whether it did."""
        from botocore.exceptions import ClientError

        try:
            self.s3.put_object(Bucket=self.bucket, Key=self._full(key), Body=data, IfNoneMatch="*")
            return True
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("PreconditionFailed", "ConditionalRequestConflict"):
                return False
            raise explain(exc, self.storage, f"write {key} to") from None

    def append(self, key: str, data: bytes) -> None:
        with self._lock:
            self._pending.setdefault(key, []).append(data)
        if time.monotonic() - self._last_flush >= APPEND_FLUSH_S:
            self.flush()

    def flush(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, {}
            self._last_flush = time.monotonic()
        for key, chunks in pending.items():
            try:
                current = self._call(f"read {key} from", self.s3.get_object, Bucket=self.bucket,
                                     Key=self._full(key))["Body"].read()
            except FileNotFoundError:
                current = b""
            self.put(key, current + b"".join(chunks))

    def exists(self, key: str) -> bool:
        if key in self._pending:
            return True
        try:
            self._call(f"look up {key} in", self.s3.head_object, Bucket=self.bucket, Key=self._full(key))
            return True
        except FileNotFoundError:
            return False

    def list(self, prefix: str) -> dict[str, int]:
        found = {}
        paginator = self.s3.get_paginator("list_objects_v2")
        full = self._full(prefix)
        try:
            for page in paginator.paginate(Bucket=self.bucket, Prefix=full):
                for item in page.get("Contents", []):
                    if item["Key"].endswith("/"):
                        continue  # a "directory" marker object some clients (pyarrow) create
                    if item["Key"] == full or item["Key"].startswith(full.rstrip("/") + "/"):
                        found[item["Key"][len(self.prefix) + 1 if self.prefix else 0:]] = item["Size"]
        except Exception as exc:  # noqa: BLE001
            raise explain(exc, self.storage, f"list {prefix} in") from None
        return found

    def children(self, prefix: str) -> list[str]:
        full = (self._full(prefix).rstrip("/") + "/") if (prefix or self.prefix) else ""
        names = set()
        paginator = self.s3.get_paginator("list_objects_v2")
        try:
            for page in paginator.paginate(Bucket=self.bucket, Prefix=full, Delimiter="/"):
                names.update(p["Prefix"][len(full):].rstrip("/") for p in page.get("CommonPrefixes", []))
                names.update(item["Key"][len(full):] for item in page.get("Contents", []))
        except Exception as exc:  # noqa: BLE001
            raise explain(exc, self.storage, f"list {prefix or '/'} in") from None
        return sorted(n for n in names if n)

    def upload_file(self, path: Path, key: str) -> None:
        self._call(f"upload {key} to", self.s3.upload_file, str(path), self.bucket, self._full(key),
                   Config=_transfer_config())

    def download_file(self, key: str, path: Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(path).with_name(f".{Path(path).name}.part")
        self._call(f"download {key} from", self.s3.download_file, self.bucket, self._full(key), str(tmp),
                   Config=_transfer_config())
        tmp.replace(path)

    def upload_hashed(self, path: Path, key: str) -> str:
        """Upload ``path`` and return the sha256 of its bytes, hashed in the one read that feeds the upload
        (multipart parts are read in order, so the hash follows the file)."""
        size = Path(path).stat().st_size
        with Path(path).open("rb") as handle:
            reader = HashingReader(handle)
            self._call(f"upload {key} to", client(self.storage, signed_payload=False).upload_fileobj, reader,
                       self.bucket, self._full(key), Config=_transfer_config(size))
            return reader.hexdigest()

    def download_hashed(self, key: str, path: Path, size: int = 0) -> str:
        """Download ``key`` to ``path`` (landing whole) and return the sha256 of the bytes, hashed as they are
        written. ``size`` (expected, e.g. from a manifest) picks how: one GET below the multipart threshold, else
        ranged parts in parallel."""
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(path).with_name(f".{Path(path).name}.part")
        if 0 < size < MULTIPART_THRESHOLD:
            sha256 = self._get_hashed(key, tmp)
        else:
            with tmp.open("wb") as handle:
                writer = HashingWriter(handle)
                self._call(f"download {key} from", self.s3.download_fileobj, self.bucket, self._full(key), writer,
                           Config=_transfer_config(size))
            sha256 = writer.hexdigest()
        tmp.replace(path)
        return sha256

    def _get_hashed(self, key: str, target: Path) -> str:
        """One GET streamed into ``target`` in this thread, hashed as it is written: a file below the multipart
        threshold needs neither s3transfer's HEAD first nor its threads (bench/bench_checkpoint_s3.py: a restore
        through download_fileobj was slower than plain download_file; this is faster). A body cut off midway
        starts over, as s3transfer retries one."""
        from s3transfer.utils import S3_RETRYABLE_DOWNLOAD_ERRORS

        for attempt in range(1, DOWNLOAD_ATTEMPTS + 1):
            response = self._call(f"download {key} from", self.s3.get_object, Bucket=self.bucket,
                                  Key=self._full(key))
            try:
                with target.open("wb") as handle:
                    writer = HashingWriter(handle)
                    for chunk in response["Body"].iter_chunks(1 << 20):
                        writer.write(chunk)
                return writer.hexdigest()
            except S3_RETRYABLE_DOWNLOAD_ERRORS as exc:
                if attempt == DOWNLOAD_ATTEMPTS:
                    raise explain(exc, self.storage, f"download {key} from") from None

    def delete_prefix(self, prefix: str) -> None:
        keys = list(self.list(prefix))
        for start in range(0, len(keys), 1000):
            batch = [{"Key": self._full(k)} for k in keys[start:start + 1000]]
            self._call(f"delete {prefix} in", self.s3.delete_objects, Bucket=self.bucket,
                       Delete={"Objects": batch, "Quiet": True})


MULTIPART_THRESHOLD = 64 * 1024**2  # below: one request per file; files go several at a time (RunFolder)
MIN_PART = 16 * 1024**2
MAX_PARTS = 9_000  # S3 allows 10,000 parts per upload; the rest is margin


def _transfer_config(size: int = 0):
    """Parts of at least 16 MiB (fewer requests, while a part still retries cheaply), grown so that a file of any
    size fits the part limit; more parts in flight for bigger files. An upload from a file object holds its parts
    in memory: at most concurrency + 2 of them."""
    from boto3.s3.transfer import TransferConfig

    mib = 1024**2
    part = max(MIN_PART, -(-size // MAX_PARTS // mib) * mib)
    concurrency = 8 if size >= 8 * part else 4
    config = TransferConfig(multipart_threshold=MULTIPART_THRESHOLD, multipart_chunksize=part,
                            max_concurrency=concurrency)
    config.max_in_memory_upload_chunks = concurrency + 2  # s3transfer's setting; boto3's constructor lacks it
    return config


_filesystems: dict[tuple, object] = {}


def pyarrow_filesystem(storage: StorageSpec):
    """The filesystem Ray Train reads checkpoints through, configured like our boto3 client; one per process and
    settings, like `client` (making one costs about 0.1 s, once per checkpoint otherwise)."""
    key = _settings_key(storage)
    with _clients_lock:
        if key not in _filesystems:
            if len(_filesystems) >= 32:
                _filesystems.pop(next(iter(_filesystems)))
            _filesystems[key] = _new_pyarrow_filesystem(storage)
        return _filesystems[key]


def _new_pyarrow_filesystem(storage: StorageSpec):
    from pyarrow.fs import AwsStandardS3RetryStrategy, S3FileSystem

    options = {
        "region": storage.region or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
        "retry_strategy": AwsStandardS3RetryStrategy(max_attempts=MAX_ATTEMPTS),
        "connect_timeout": CONNECT_TIMEOUT_S,
        "request_timeout": READ_TIMEOUT_S,
        "force_virtual_addressing": storage.addressing_style == "virtual",
    }
    if storage.endpoint_url:
        endpoint = urlparse(storage.endpoint_url)
        options.update(endpoint_override=endpoint.netloc, scheme=endpoint.scheme or "https")
    if storage.ca_bundle:
        options["tls_ca_file_path"] = storage.ca_bundle
    return S3FileSystem(**options)


def sdk_environment(storage: StorageSpec) -> dict[str, str]:
    """Variables that make every AWS SDK in the worker processes (pyarrow's C++ one too) behave like ours."""
    env = {"AWS_REQUEST_CHECKSUM_CALCULATION": storage.checksum_mode.upper(),
           "AWS_RESPONSE_CHECKSUM_VALIDATION": storage.checksum_mode.upper()}
    if storage.endpoint_url:
        env["AWS_ENDPOINT_URL_S3"] = storage.endpoint_url
    return env


def fetch_prefix(storage: StorageSpec, uri: str, kind: str, pattern: str = "*") -> Path:
    """Download every object under ``uri`` (a model folder or a dataset prefix) once per node.

    The copy lives in ``<cache>/<kind>/<bucket>/<key>/`` and is reused while the listing (keys, sizes, ETags)
    is unchanged; a lock keeps the workers of one node from downloading the same files side by side, and a
    listing file written last marks the copy complete.
    """
    from filelock import FileLock

    bucket, key = split_uri(uri)
    target = cache_root() / kind / bucket / key
    target.parent.mkdir(parents=True, exist_ok=True)
    s3 = client(storage)
    listing = {name: entry for name, entry in _listing(s3, storage, bucket, key).items()
               if fnmatch.fnmatch(name, pattern)}
    if not listing:
        raise StorageError(f"{uri}/{pattern if pattern != '*' else ''}: no objects match (check the bucket and "
                           "the path)")
    marker = target / f".tunerun-listing-{hashlib.sha256(pattern.encode()).hexdigest()[:12]}.json"
    with FileLock(str(target) + ".lock"):
        previous = json.loads(marker.read_text()) if marker.is_file() else {}
        if previous == listing:
            return target
        marker.unlink(missing_ok=True)  # incomplete until every changed object is fetched again
        for name, (size, etag) in listing.items():
            local = target / name
            if previous.get(name) == [size, etag] and local.is_file() and local.stat().st_size == size:
                continue
            local.parent.mkdir(parents=True, exist_ok=True)
            part = local.with_name(f".{local.name}.part")
            try:
                s3.download_file(bucket, f"{key}/{name}" if key else name, str(part), Config=_transfer_config())
            except Exception as exc:  # noqa: BLE001
                raise explain(exc, storage, f"download {uri}/{name} from") from None
            if part.stat().st_size != size:
                raise StorageError(f"{uri}/{name}: downloaded {part.stat().st_size} bytes, expected {size}")
            part.replace(local)
        marker.write_text(json.dumps(listing))
    return target


def _listing(s3, storage: StorageSpec, bucket: str, key: str) -> dict[str, list]:
    prefix = key.rstrip("/") + "/" if key else ""
    found = {}
    try:
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for item in page.get("Contents", []):
                if not item["Key"].endswith("/"):
                    found[item["Key"][len(prefix):]] = [item["Size"], item.get("ETag", "")]
    except Exception as exc:  # noqa: BLE001
        raise explain(exc, storage, f"list s3://{bucket}/{key} in") from None
    return found
