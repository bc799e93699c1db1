"""The one place that turns a URI into a filesystem.

URIs are local paths, ``file://...`` or ``s3://bucket/key``. S3-compatible stores (MinIO, Ceph,
moto) are reached through ``storage.endpoint_url`` or the standard ``AWS_ENDPOINT_URL(_S3)``
variable; credentials come only from the standard AWS sources (environment, profile, instance
role) and never pass through config, logs, errors or outputs. Nothing else in the code base
knows about S3.

Filesystems are built lazily and cached per process, so Ray tasks receive only the (secret-free)
:class:`StorageConfig` and resolve the filesystem themselves.

Retries. Every read, write, list and delete of this module (and :func:`call` for other code)
retries *transient* failures -- 5xx, throttling (SlowDown), connection refused/reset/dropped,
timeouts, truncated bodies -- ``storage.retries`` times with exponential backoff and full jitter
(sleep uniform in ``[0, min(retry_max_s, 0.2 s * 2**k)]``); 403/404 and other client errors
fail at once. The S3 filesystem these calls use has the AWS SDK's own retries set to a single
attempt, so the two never multiply (3 SDK tries x 5 of ours = 15 requests per read). The
filesystem :func:`resolve` hands to *other* code (Ray Train/Tune storage, Ray Data writes,
pyarrow Parquet readers) keeps the SDK's standard strategy with ``retries + 1`` attempts: that
code cannot be wrapped, and the SDK covers most of the same failures there (not truncated
bodies). A failure that is given up says how many tries were made (``... [3 tries]``).
:func:`retried_requests` counts the retried requests of this process.
"""

from __future__ import annotations

import functools
import hashlib
import os
import posixpath
import random
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TypeVar

import pyarrow.fs as pafs

from prn_ray.config import StorageConfig

_SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID")
T = TypeVar("T")


@dataclass(frozen=True)
class Location:
    """A resolved URI: a filesystem plus the path inside it."""

    fs: pafs.FileSystem
    path: str
    scheme: str  # "s3" or "file"

    def uri(self, path: str | None = None) -> str:
        p = self.path if path is None else path
        return f"s3://{p}" if self.scheme == "s3" else p


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://") or uri.startswith("s3a://")


def join(uri: str, *parts: str) -> str:
    """Join URI segments with ``/`` (never the OS separator: S3 keys are POSIX-like)."""
    out = uri.rstrip("/")
    for part in parts:
        part = str(part).strip("/")
        if part:
            out = f"{out}/{part}"
    return out


def endpoint_for(cfg: StorageConfig | None) -> str | None:
    if cfg is not None and cfg.endpoint_url:
        return cfg.endpoint_url
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


@functools.lru_cache(maxsize=16)
def _s3_filesystem(endpoint: str | None, region: str | None,
                   sdk_attempts: int = 3) -> pafs.S3FileSystem:
    kwargs: dict = {"retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=sdk_attempts)}
    if endpoint:
        kwargs["endpoint_override"] = endpoint
        kwargs["scheme"] = "https" if endpoint.startswith("https") else "http"
        # S3-compatible servers rarely support virtual-host addressing.
        kwargs["force_virtual_addressing"] = False
    kwargs["region"] = region or os.environ.get("AWS_DEFAULT_REGION") or os.environ.get(
        "AWS_REGION", "us-east-1"
    )
    kwargs["check_directory_existence_before_creation"] = False
    return pafs.S3FileSystem(**kwargs)


def resolve(uri: str, cfg: StorageConfig | None = None, *, sdk_retries: bool = True
            ) -> Location:
    """URI -> :class:`Location`. Relative local paths are made absolute. ``sdk_retries=False``:
    the S3 filesystem without the SDK's retries (for calls wrapped in :func:`call`)."""
    if is_s3(uri):
        path = uri.split("://", 1)[1].rstrip("/")
        region = cfg.region if cfg is not None else None
        attempts = _retry_settings(cfg)[0] + 1 if sdk_retries else 1
        return Location(_s3_filesystem(endpoint_for(cfg), region, attempts), path, "s3")
    if uri.startswith("file://"):
        uri = uri[len("file://") :]
    return Location(pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri)), "file")


# ----------------------------------------------------------------------------- retries

# What pyarrow's S3 filesystem raises: OSError whose message names the AWS error
# ("AWS Error SLOW_DOWN during GetObject", "AWS Error UNKNOWN (HTTP status 503) during ...",
# "AWS Error NETWORK_CONNECTION ... curlCode: 18, Transferred a partial file" for a connection
# dropped mid-body, curlCode 7 refused, 28 timeout, 52 empty reply, 56 reset); a missing key is
# FileNotFoundError, a 403 "AWS Error ACCESS_DENIED". Checked against tests/faultproxy.py.
_PERMANENT = re.compile(r"ACCESS_DENIED|AccessDenied|NO_SUCH_|NoSuch|HTTP status 4(?!08|29)\d\d|"
                        r"INVALID_|InvalidAccessKey|SignatureDoesNotMatch|PreconditionFailed")
_TRANSIENT = re.compile(r"(?i)HTTP status (5\d\d|408|429)|SLOW_?DOWN|THROTTL|SERVICE_UNAVAILABLE|"
                        r"INTERNAL_FAILURE|InternalError|REQUEST_TIME_?OUT|NETWORK_CONNECTION|"
                        r"curlCode|connection (reset|refused|aborted|closed)|broken pipe|"
                        r"timed out|timeout|partial file|truncated body|unexpected eof")
_BACKOFF_BASE_S = 0.2
_retried = 0
_retried_lock = threading.Lock()


class TruncatedBody(OSError):
    """Fewer bytes arrived than the object holds (a connection dropped mid-body)."""


def is_transient(exc: BaseException) -> bool:
    """True for failures a later try may not meet; never for a missing object or a 4xx."""
    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError,
                        NotADirectoryError, FileExistsError)):
        return False
    if isinstance(exc, (TruncatedBody, ConnectionError, TimeoutError)):
        return True
    if not isinstance(exc, OSError):
        return False
    text = str(exc)
    return not _PERMANENT.search(text) and bool(_TRANSIENT.search(text))


def retried_requests() -> int:
    """Requests of this process that failed transiently and were tried again."""
    return _retried


def _retry_settings(cfg: StorageConfig | None) -> tuple[int, float]:
    cfg = cfg or StorageConfig()
    return max(0, int(cfg.retries)), max(0.0, float(cfg.retry_max_s))


def _with_tries(exc: BaseException, tries: int) -> BaseException:
    """The same kind of exception, its message ending in the number of tries made."""
    note = f"[{tries} {'try' if tries == 1 else 'tries'}]"
    try:
        out = type(exc)(f"{exc} {note}")
    except Exception:  # noqa: BLE001 - an exception type with another signature
        out = OSError(f"{type(exc).__name__}: {exc} {note}")
    out.tries = tries  # type: ignore[attr-defined]
    return out


def call(fn: Callable[[], T], cfg: StorageConfig | None = None) -> T:
    """``fn()`` with transient failures retried (module doc). A failure that ends the tries is
    re-raised as the same exception type, its message ending in ``[N tries]``."""
    retries, cap = _retry_settings(cfg)
    global _retried
    for k in range(retries + 1):
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - classified below, re-raised when permanent
            if k == retries or not is_transient(exc):
                raise _with_tries(exc, k + 1) from exc
            with _retried_lock:
                _retried += 1
            time.sleep(random.uniform(0.0, min(cap, _BACKOFF_BASE_S * 2 ** k)))
    raise AssertionError("unreachable")


def _read_once(uri: str, cfg: StorageConfig | None, nbytes: int | None) -> bytes:
    loc = resolve(uri, cfg, sdk_retries=False)
    if loc.scheme == "s3":
        # open_input_file knows the size (HEAD) and fetches the object in one GET; the S3
        # input *stream*'s read() grows chunk by chunk: 10x slower from 5 MB, 60x at 40 MB
        # (model weights) on the loopback server. Same cost for small images.
        with loc.fs.open_input_file(loc.path) as f:
            want = f.size() if nbytes is None else min(nbytes, f.size())
            data = f.read(want)
        if len(data) != want:  # a body cut short must never pass for the object
            raise TruncatedBody(f"read {len(data)} of {want} bytes of {uri}")
        return data
    with loc.fs.open_input_stream(loc.path) as f:
        return f.read() if nbytes is None else f.read(nbytes)


def read_bytes(uri: str, cfg: StorageConfig | None = None) -> bytes:
    return call(lambda: _read_once(uri, cfg, None), cfg)


def read_head(uri: str, cfg: StorageConfig | None = None, nbytes: int = 65536) -> bytes:
    """The first ``nbytes`` of an object (a ranged read on S3)."""
    return call(lambda: _read_once(uri, cfg, nbytes), cfg)


def _write_once(uri: str, data: bytes, cfg: StorageConfig | None) -> None:
    loc = resolve(uri, cfg, sdk_retries=False)
    parent = posixpath.dirname(loc.path)
    if loc.scheme == "file":
        os.makedirs(parent, exist_ok=True)
        tmp = f"{loc.path}.tmp-{uuid.uuid4().hex}"
        with loc.fs.open_output_stream(tmp) as f:
            f.write(data)
        os.replace(tmp, loc.path)
    else:
        with loc.fs.open_output_stream(loc.path) as f:
            f.write(data)


def write_bytes(uri: str, data: bytes, cfg: StorageConfig | None = None) -> None:
    """Write an object. On S3 a single PUT is atomic for readers; locally we publish via rename.
    A retried write rewrites the whole object (idempotent)."""
    call(lambda: _write_once(uri, data, cfg), cfg)


def copy_file(src: str, dst: str, cfg: StorageConfig | None = None) -> None:
    """Copy one object (S3: server-side CopyObject)."""
    def once() -> None:
        a, b = resolve(src, cfg, sdk_retries=False), resolve(dst, cfg, sdk_retries=False)
        if b.scheme == "file":
            b.fs.create_dir(posixpath.dirname(b.path), recursive=True)
        a.fs.copy_file(a.path, b.path)
    call(once, cfg)


def read_text(uri: str, cfg: StorageConfig | None = None) -> str:
    return read_bytes(uri, cfg).decode("utf-8")


def write_text(uri: str, text: str, cfg: StorageConfig | None = None) -> None:
    write_bytes(uri, text.encode("utf-8"), cfg)


def _info(uri: str, cfg: StorageConfig | None) -> pafs.FileInfo:
    loc = resolve(uri, cfg, sdk_retries=False)
    return call(lambda: loc.fs.get_file_info(loc.path), cfg)


def exists(uri: str, cfg: StorageConfig | None = None) -> bool:
    return _info(uri, cfg).type != pafs.FileType.NotFound


def is_file(uri: str, cfg: StorageConfig | None = None) -> bool:
    return _info(uri, cfg).type == pafs.FileType.File


def size(uri: str, cfg: StorageConfig | None = None) -> int | None:
    """Bytes of a stored file, or None when there is no file at ``uri``."""
    info = _info(uri, cfg)
    return int(info.size) if info.type == pafs.FileType.File else None


def list_files(
    uri: str,
    cfg: StorageConfig | None = None,
    recursive: bool = True,
    extensions: Iterable[str] | None = None,
) -> list[str]:
    """Sorted URIs of the files under ``uri`` (empty when it does not exist)."""
    loc = resolve(uri, cfg, sdk_retries=False)
    info = _info(uri, cfg)
    if info.type == pafs.FileType.NotFound:
        return []
    if info.type == pafs.FileType.File:
        return [loc.uri()]
    sel = pafs.FileSelector(loc.path, recursive=recursive, allow_not_found=True)
    exts = tuple(e.lower() if e.startswith(".") else "." + e.lower() for e in extensions or ())
    out = []
    for fi in call(lambda: loc.fs.get_file_info(sel), cfg):
        if fi.type != pafs.FileType.File:
            continue
        if exts and not fi.path.lower().endswith(exts):
            continue
        out.append(loc.uri(fi.path))
    return sorted(out)


def fingerprint(uris: Iterable[str], cfg: StorageConfig | None = None) -> str:
    """SHA-256 over the files' URIs, sizes and modification times (one metadata call per
    filesystem): changes when any file is added, removed or rewritten (S3 modification times
    have one-second resolution: a same-size rewrite within that second goes unseen). Missing
    files count as such, so a fingerprint never raises for them."""
    groups: dict[int, tuple[pafs.FileSystem, list[str], list[str]]] = {}
    for uri in uris:
        loc = resolve(uri, cfg, sdk_retries=False)
        _, paths, originals = groups.setdefault(id(loc.fs), (loc.fs, [], []))
        paths.append(loc.path)
        originals.append(uri)
    h = hashlib.sha256()
    for fs, paths, originals in groups.values():
        infos = call(lambda fs=fs, paths=paths: fs.get_file_info(paths), cfg)
        for uri, fi in zip(originals, infos):
            mtime = fi.mtime_ns if fi.type == pafs.FileType.File else None
            h.update(f"{uri}\0{fi.type}\0{fi.size}\0{mtime}\n".encode())
    return h.hexdigest()


def list_dirs(uri: str, cfg: StorageConfig | None = None) -> list[str]:
    """Sorted names (not URIs) of the immediate sub-directories of ``uri``."""
    loc = resolve(uri, cfg, sdk_retries=False)
    sel = pafs.FileSelector(loc.path, recursive=False, allow_not_found=True)
    return sorted(
        posixpath.basename(fi.path)
        for fi in call(lambda: loc.fs.get_file_info(sel), cfg)
        if fi.type == pafs.FileType.Directory
    )


def delete_dir(uri: str, cfg: StorageConfig | None = None) -> None:
    loc = resolve(uri, cfg, sdk_retries=False)
    if _info(uri, cfg).type != pafs.FileType.NotFound:
        _delete_retried(loc.fs.delete_dir, loc.path, cfg)


def delete_file(uri: str, cfg: StorageConfig | None = None) -> None:
    loc = resolve(uri, cfg, sdk_retries=False)
    if _info(uri, cfg).type == pafs.FileType.File:
        _delete_retried(loc.fs.delete_file, loc.path, cfg)


def _delete_retried(delete: Callable[[str], None], path: str,
                    cfg: StorageConfig | None) -> None:
    def once() -> None:
        try:
            delete(path)
        except FileNotFoundError:
            pass  # a retried delete whose first try went through
    call(once, cfg)


# ----------------------------------------------------------------------------- secrets

_ASSIGNMENT = re.compile(
    r"(?i)\b(aws_secret_access_key|aws_session_token|aws_access_key_id|secret[_-]?key|password)"
    r"(\s*[=:]\s*)\S+"
)
_ACCESS_KEY_ID = re.compile(r"\b(AKIA|ASIA)[A-Z0-9]{12,}\b")


def redact(text: str) -> str:
    """Remove credentials from a message before it reaches a log, an error row or a report."""
    out = str(text)
    for name in _SECRET_ENV:
        value = os.environ.get(name)
        if value and len(value) >= 4:
            out = out.replace(value, "***")
    out = _ASSIGNMENT.sub(lambda m: f"{m.group(1)}{m.group(2)}***", out)
    return _ACCESS_KEY_ID.sub("***", out)
