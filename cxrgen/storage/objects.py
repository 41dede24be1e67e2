"""A run under an object-store prefix (s3:// through s3fs): one PUT per image, one immutable record object per
batch, and create-if-absent writes (If-None-Match: *) where a local folder has renames and locks.

Every request is retried with exponential backoff and jitter on transient failures (5xx, throttling, lost
connections); one that outlasts the retries becomes one line (RunError, resumable). Credentials come from the
usual places (AWS variables, profiles, roles; AWS_ENDPOINT_URL for S3-compatible stores) and never appear in a
message: the few server texts that are quoted are scrubbed of the credential values in the environment.
The protocol itself is written down in docs/storage.md ("The commit protocol for object stores").
"""
from __future__ import annotations

import json
import os
import random
import secrets
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

from cxrgen.errors import CxrgenError, InputError, RunError, first_line
from cxrgen.files import STATE_DIR, resume_command
from cxrgen.storage.base import RECORDS_DIR, WHOLE, Claim, RecordPart, RecordWriter, Store, shares_overlap
from cxrgen.storage.claims import ClaimBook

MERGES_DIR = f"{STATE_DIR}/merges"
_PROBE = f"{STATE_DIR}/write-probe"
_SECRETS = ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN")
# Answers to retry: throttling, server errors, a clock off by minutes (403 RequestTimeTooSkewed: the SDK re-signs
# with the server's time), and a conditional write that raced another operation on the key (409
# ConditionalRequestConflict / OperationAborted: S3 asks the caller to retry; the retry then finds the key taken
# or free and answers as a first try would).
_THROTTLED = {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "RequestTimeTooSkewed",
              "InternalError", "ServiceUnavailable", "RequestLimitExceeded", "TooManyRequests", "503",
              "ConditionalRequestConflict", "OperationAborted"}
_CREDENTIALS = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken", "TokenRefreshRequired",
                "InvalidClientTokenId", "AuthorizationHeaderMalformed"}
_MULTIPART_FROM = 256 * 2**20  # bytes: bigger files are committed in parts, so memory stays at one part
_PART = 64 * 2**20
_FETCH_THREADS = 32


def scrub(text: str) -> str:
    """The text with every credential value of the environment replaced by ***."""
    for name in _SECRETS:
        value = os.environ.get(name, "")
        if len(value) >= 4:
            text = text.replace(value, "***")
    return text


def _response(exc: BaseException) -> dict:
    """The S3 error response carried by an exception or its cause (s3fs translates ClientError into OSError)."""
    for candidate in (exc, exc.__cause__, exc.__context__):
        response = getattr(candidate, "response", None)
        if isinstance(response, dict) and "Error" in response:
            return response
    return {}


def _detail(exc: BaseException) -> str:
    """"503 SlowDown" for an S3 error response, else the exception's first line (scrubbed)."""
    response = _response(exc)
    if response:
        return f"{response.get('ResponseMetadata', {}).get('HTTPStatusCode', '?')} {response['Error'].get('Code', '')}"
    return scrub(first_line(exc, with_type=True))


def classify(exc: BaseException) -> str:
    """transient, credentials, permission, bucket, absent, exists or other."""
    response = _response(exc)
    code = str(response.get("Error", {}).get("Code", ""))
    status = int(response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
    names = {type(e).__name__ for e in (exc, exc.__cause__, exc.__context__) if e is not None}
    if names & {"NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError"} or code in _CREDENTIALS:
        return "credentials"
    if code == "NoSuchBucket":
        return "bucket"
    if isinstance(exc, FileExistsError) or code == "PreconditionFailed":
        return "exists"
    if status >= 500 or code in _THROTTLED or status == 429:
        return "transient"
    if code in ("AccessDenied", "AllAccessDisabled", "Forbidden") or status == 403 or isinstance(exc, PermissionError):
        return "permission"
    if isinstance(exc, FileNotFoundError) or code in ("NoSuchKey", "NotFound", "404"):
        return "absent"
    if isinstance(exc, (ConnectionError, TimeoutError)) or names & {
            "EndpointConnectionError", "ConnectionClosedError", "ReadTimeoutError", "ConnectTimeoutError",
            "ClientConnectorError", "ServerDisconnectedError", "ClientOSError", "FSTimeoutError", "HTTPClientError",
            "ClientPayloadError", "ResponseParserError", "IncompleteRead"}:
        return "transient"
    return "other"


def _stamp() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")


class ObjectStore(Store):
    """A run under s3://BUCKET/PREFIX (also any S3-compatible store through AWS_ENDPOINT_URL)."""

    write_threads = 8  # PUTs wait on the network, not the CPU: more in flight keeps a GPU from waiting

    def __init__(self, url: str, scheme: str, bucket: str, prefix: str, *, attempts: int = 8,
                 backoff_s: float = 0.2, claim_timeout_s: float = 60.0):
        self.url, self.scheme, self.bucket, self.prefix = url, scheme, bucket, prefix
        self.attempts, self.backoff_s = attempts, backoff_s
        # names this process's record objects: unique across hosts and restarts, oldest first when sorted
        self.session = f"{_stamp()}-{secrets.token_hex(3)}"
        self.wrote = False  # once this process wrote anything, a failure is a resumable RunError, not bad input
        self.lost: str | None = None  # set when another process took this process's claim over
        self._fs = None
        self.claims = ClaimBook(self, claim_timeout_s)

    # ------------------------------------------------------------------ requests, retries and errors

    @property
    def fs(self):
        if self._fs is None:
            import s3fs

            # cxrgen retries (below) with one policy for every call: no second loop inside s3fs or botocore
            self._fs = s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False, config_kwargs={
                "retries": {"total_max_attempts": 1}, "max_pool_connections": 64, "connect_timeout": 10,
                "read_timeout": 60})
            self._fs.retries = 1
        return self._fs

    def key(self, name: str) -> str:
        """bucket/prefix/name, the path s3fs takes."""
        return "/".join(p for p in (self.bucket, self.prefix, name) if p)

    def call(self, what: str, name: str, fn, *args, retried: list | None = None, **kwargs):
        """fn(*args, **kwargs), retried on transient failures; other failures become one-line errors.

        FileNotFoundError (absent) and FileExistsError (a conditional create lost) reach the caller as they are.
        retried: gets an entry per retry (a create retried after a lost answer may find its own object).
        """
        delay, started = self.backoff_s, time.monotonic()
        for attempt in range(1, self.attempts + 1):
            try:
                return fn(*args, **kwargs)
            except CxrgenError:
                raise
            except Exception as exc:  # noqa: BLE001 - every failure is classified, then retried or named
                kind = classify(exc)
                if kind == "absent":
                    raise FileNotFoundError(self.where(name)) from None
                if kind == "exists":
                    raise FileExistsError(self.where(name)) from None
                if kind == "transient" and attempt < self.attempts:
                    if retried is not None:
                        retried.append(kind)
                    time.sleep(random.uniform(delay / 2, delay))  # jitter: many writers must not retry in step
                    delay = min(delay * 2, 8.0)
                    continue
                raise self.error(kind, exc, what, name, attempt, time.monotonic() - started) from None

    def error(self, kind: str, exc: BaseException, what: str, name: str, attempts: int = 1,
              seconds: float = 0.0) -> CxrgenError:
        """One line naming the URL and the fix; bad input (nothing written yet) or a resumable failure."""
        where = self.where(name)
        if kind == "credentials":
            text = (f"no valid credentials to {what} {where}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or "
                    "AWS_PROFILE, or run where an instance or pod role applies")
        elif kind == "bucket":
            text = (f"the bucket {self.bucket} of {self.url} does not exist; create it (e.g. `aws s3 mb "
                    f"s3://{self.bucket}`) or fix the URL")
        elif kind == "permission":
            text = (f"no permission to {what} {where}; grant s3:GetObject, s3:PutObject, s3:DeleteObject and "
                    f"s3:ListBucket on {self.url}/* to these credentials, or use others")
        elif kind == "transient":
            text = (f"cannot {what} {where}: the store kept failing ({_detail(exc)}) through {attempts} attempts "
                    f"in {seconds:.0f} s; check the store and the network")
        else:
            text = f"cannot {what} {where}: {_detail(exc)}"
        if not self.wrote and kind in ("credentials", "bucket", "permission"):
            return InputError(text)
        return RunError(f"{text}; then run `{resume_command(self.url)}`")

    # ------------------------------------------------------------------ whole objects

    def exists(self) -> bool:
        return bool(self.entries())

    def entries(self) -> list[str]:
        try:
            found = self.call("list", "", self.fs.ls, self.key(""), detail=False, refresh=True)
        except FileNotFoundError:
            return []
        return sorted({path.rstrip("/").rsplit("/", 1)[-1] for path in found if path.rstrip("/") != self.key("")})

    def read_bytes(self, name: str) -> bytes | None:
        try:
            return self.call("read", name, self.fs.cat_file, self.key(name))
        except FileNotFoundError:
            return None

    def write_bytes(self, name: str, data: bytes) -> None:
        if self.lost and name.startswith(RECORDS_DIR):
            raise RunError(self.lost)
        self.call("write", name, self.fs.pipe_file, self.key(name), data)
        self.wrote = True

    def create_bytes(self, name: str, data: bytes) -> bool:
        """PUT with If-None-Match: *; False when the name exists. After a retry the existing object may be this
        call's own first attempt, whose answer was lost: then it holds exactly these bytes."""
        retried: list = []
        try:
            self.call("create", name, self.fs.pipe_file, self.key(name), data, mode="create", retried=retried)
        except FileExistsError:
            return bool(retried) and self.read_bytes(name) == data
        self.wrote = True
        return True

    def create_json(self, name: str, data: dict) -> bool:
        return self.create_bytes(name, (json.dumps(data, indent=2, sort_keys=False) + "\n").encode("utf-8"))

    def commit(self, name: str, source: Path) -> bool:
        size = Path(source).stat().st_size
        if size < _MULTIPART_FROM:
            return self.create_bytes(name, Path(source).read_bytes())
        return self._commit_in_parts(name, Path(source))

    def _commit_in_parts(self, name: str, source: Path) -> bool:
        """A multipart upload whose completion is conditional (If-None-Match: *): memory holds one part."""
        s3, key = self.fs.call_s3, self.key(name).split("/", 1)[1]
        upload = self.call("start an upload of", name, s3, "create_multipart_upload", Bucket=self.bucket, Key=key)
        parts = []
        try:
            with open(source, "rb") as handle:
                for number in range(1, 10_001):
                    chunk = handle.read(_PART)
                    if not chunk:
                        break
                    done = self.call("upload", name, s3, "upload_part", Bucket=self.bucket, Key=key,
                                     PartNumber=number, UploadId=upload["UploadId"], Body=chunk)
                    parts.append({"PartNumber": number, "ETag": done["ETag"]})
            retried: list = []
            self.call("commit", name, s3, "complete_multipart_upload", Bucket=self.bucket, Key=key,
                      UploadId=upload["UploadId"], MultipartUpload={"Parts": parts}, IfNoneMatch="*", retried=retried)
        except (FileExistsError, FileNotFoundError) as exc:
            # after a retry, the object there may be this upload, completed by an attempt whose answer was lost
            if parts and retried and self._etag(name) == _multipart_etag(parts):
                self.wrote = True
                return True
            if isinstance(exc, FileNotFoundError):
                raise self.error("other", exc, "commit", name) from None
            self.call("abort an upload of", name, s3, "abort_multipart_upload", Bucket=self.bucket, Key=key,
                      UploadId=upload["UploadId"])
            return False
        self.wrote = True
        return True

    def _etag(self, name: str) -> str | None:
        try:
            return str(self.call("read", name, self.fs.info, self.key(name)).get("ETag", "")).strip('"')
        except FileNotFoundError:
            return None

    def upload(self, name: str, source: Path) -> None:
        """Write a local file as one object (multipart when large); the object appears when complete."""
        self.call("write", name, self.fs.put_file, str(source), self.key(name))
        self.wrote = True

    def details(self, prefix: str) -> dict[str, dict]:
        """name -> {"size", "mtime" (seconds since the epoch, the store's clock)} of every object under prefix/."""
        try:
            found = self.call("list", prefix, self.fs.find, self.key(prefix), detail=True)
        except FileNotFoundError:
            return {}
        start = len(self.key("")) + 1 if self.key("") else 0
        result = {}
        for path, info in found.items():
            if info.get("type") == "directory":
                continue
            modified = info.get("LastModified")
            result[path[start:]] = {"size": int(info.get("size") or 0),
                                    "mtime": modified.timestamp() if modified is not None else 0.0}
        return result

    def sizes(self, names: list[str]) -> list[int | None]:
        if len(names) <= 16:  # a few HEADs beat listing whole folders
            return [self._head(name) for name in names]
        folders = sorted({name.rpartition("/")[0] for name in names})
        found: dict[str, int] = {}
        with ThreadPoolExecutor(max_workers=_FETCH_THREADS) as pool:
            for listing in pool.map(self._sizes_in, folders):
                found.update(listing)
        return [found.get(name) for name in names]

    def _sizes_in(self, folder: str) -> dict[str, int]:
        # only the folder's own objects: a root-level folder ("") must not list the whole run
        return {name: info["size"] for name, info in self.details(folder).items()
                if name.rpartition("/")[0] == folder}

    def _head(self, name: str) -> int | None:
        try:
            return int(self.call("read", name, self.fs.info, self.key(name))["size"])
        except FileNotFoundError:
            return None

    def list_names(self, prefix: str) -> set[str]:
        return set(self.details(prefix))

    def delete(self, name: str) -> None:
        try:
            self.call("delete", name, self.fs.rm_file, self.key(name))
        except FileNotFoundError:
            pass

    def open_input(self, name: str):
        return self.call("read", name, self.fs.open, self.key(name), "rb")

    def read_many(self, names):
        """Fetch ahead on threads (a bounded window), yield in order."""
        names = list(names)
        with ThreadPoolExecutor(max_workers=_FETCH_THREADS) as pool:
            window = 4 * _FETCH_THREADS
            pending = [pool.submit(self.read_bytes, n) for n in names[:window]]
            for index in range(len(names)):
                data = pending[index].result()
                pending[index] = None  # let the bytes go once yielded
                if index + window < len(names):
                    pending.append(pool.submit(self.read_bytes, names[index + window]))
                yield data

    def check_writable(self) -> None:
        """A conditional PUT that cannot succeed (If-Match on an ETag no object has): 412 or 404 mean "allowed",
        403 "not allowed"; the store is asked about permission without anything being written."""
        key = self.key(_PROBE).split("/", 1)[1]
        try:
            self.call("write", "", self.fs.call_s3, "put_object", Bucket=self.bucket, Key=key, Body=b"",
                      IfMatch='"00000000000000000000000000000000"')
        except (FileNotFoundError, FileExistsError):
            return
        # the store ignored the condition: it would also ignore If-None-Match, and claims would not be safe
        self.delete(_PROBE)
        raise InputError(f"the store of {self.url} ignores conditional writes (If-Match / If-None-Match), which "
                         "cxrgen needs to create run.json, claims and metadata.parquet exactly once; use a store "
                         "that supports them (AWS S3, MinIO, Ceph RGW of 2024 or later) or a local folder")

    # ------------------------------------------------------------------ the commit protocol

    def record_writer(self, writer: str, share: tuple[int, int] = WHOLE, folder: str = RECORDS_DIR) -> RecordWriter:
        return _RecordObjects(self, writer, share, folder)

    def record_parts(self, share: tuple[int, int] | None = None, folder: str = RECORDS_DIR) -> list[RecordPart]:
        try:
            folders = self.call("list", folder, self.fs.ls, self.key(folder), detail=False, refresh=True)
        except FileNotFoundError:
            return []
        shares = [path.rstrip("/").rsplit("/", 1)[-1] for path in folders]
        wanted = [s for s in shares if share is None or shares_overlap(share, _parse_share(s))]
        names: list[str] = []
        with ThreadPoolExecutor(max_workers=_FETCH_THREADS) as pool:
            for listing in pool.map(lambda s: self.details(f"{folder}/{s}"), wanted):
                names += [n for n in listing if n.endswith(".jsonl")]
        names.sort()
        # one writer's objects in the order it wrote them (the names end in its batch count), many to a part: the
        # JSON reader's per-call cost is paid per part, not per batch
        writers: dict[str, list[str]] = {}
        for name in names:
            writers.setdefault(name.rsplit("-", 1)[0], []).append(name)
        return [_ObjectPart(self, group[i:i + 2048], writer) for writer, group in writers.items()
                for i in range(0, len(group), 2048)]

    def check_free(self, shared: bool) -> None:
        self.claims.refuse_if_taken(None if shared else WHOLE)

    def claim_share(self, rank: int, world_size: int, scope: str) -> Claim:
        return self.claims.acquire((rank, world_size), scope)

    def claim_folder(self, shared: bool) -> Claim:
        return Claim() if shared else self.claims.acquire(WHOLE, "all")  # a rank already holds its share

    def running_ranks(self, scope: str, exclude: int) -> set[int]:
        return self.claims.running(scope, exclude)

    def log_merge(self, line: str) -> None:
        host = "".join(c if c.isalnum() or c in "-_" else "_" for c in socket.gethostname())[:32]
        self.write_bytes(f"{MERGES_DIR}/{_stamp()}-{host}-{os.getpid()}-{secrets.token_hex(3)}.log",
                         f"{datetime.now(timezone.utc).isoformat(timespec='seconds')} {line}\n".encode())


def _multipart_etag(parts: list[dict]) -> str:
    """S3's ETag of a completed multipart upload: md5 of the parts' md5s, then "-" and the number of parts."""
    import hashlib

    digests = b"".join(bytes.fromhex(part["ETag"].strip('"')) for part in parts)
    return f"{hashlib.md5(digests).hexdigest()}-{len(parts)}"


def share_folder(share: tuple[int, int]) -> str:
    """The records folder of a share: w<world_size>-r<rank>."""
    return f"w{share[1]}-r{share[0]}"


def _parse_share(folder: str) -> tuple[int, int]:
    try:
        world, rank = folder.split("-")
        return int(rank[1:]), int(world[1:])
    except ValueError:
        return WHOLE  # not cxrgen's: read it, as a share that overlaps everything


class _RecordObjects(RecordWriter):
    """One immutable object per batch: written after the batch's images, named uniquely by session and count."""

    def __init__(self, store: ObjectStore, writer: str, share: tuple[int, int], folder: str = RECORDS_DIR):
        self.store, self.count = store, 0
        self.prefix = f"{folder}/{share_folder(share)}/{store.session}-{writer}"

    def write(self, data: bytes) -> None:
        self.count += 1
        self.store.write_bytes(f"{self.prefix}-{self.count:08d}.jsonl", data)


class _ObjectPart(RecordPart):
    def __init__(self, store: ObjectStore, names: list[str], writer: str = ""):
        self.store, self.names, self.writer = store, names, writer
        self.name = names[0] if names else ""

    def read(self) -> bytes:
        # a record object always ends with a newline; one that vanished (deleted by hand) is simply absent
        return b"".join(data for data in self.store.read_many(self.names) if data)

    def chunks(self):
        yield self.read()  # 2,048 batches' records at most
