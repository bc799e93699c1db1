"""One committer per partition: a lease object per (date, product), created only if absent.

``<output>/_leases/<date>/<product>.json`` holds ``{run_id, token, expires_at}`` (UNIX seconds,
the holder's clock: keep the clocks of the machines that score within a few seconds). A run
takes the leases of all its partitions (sorted, all or none) before its first commit, renews
them every ``ttl/3`` while it commits, checks them before each commit point, and deletes them
at the end. Another run of the same date waits (``score.lease_wait_s``) and then gives up with
:class:`LeaseBusy` (``jobs/score.py`` exit status 4); a lease whose holder died is taken over
once it has expired.

Atomic create / replace: on S3 a conditional PUT (``If-None-Match: *`` to create,
``If-Match: <etag>`` to renew or take over an expired lease) through boto3 -- pyarrow's
filesystem cannot make conditional writes, so this module is the only user of boto3. On
local storage ``O_CREAT|O_EXCL`` creates; a takeover first hard-links the expired lease to a
name derived from its token (only one taker can make that link), then replaces it.
"""

from __future__ import annotations

import functools
import json
import os
import secrets
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from urllib.parse import quote

from prn_ray import storage
from prn_ray.config import StorageConfig
from prn_ray.scoring.table import ScoringError

POLL_S = 2.0  # how often a waiting run looks at the leases again


class LeaseBusy(ScoringError):
    """Another live run holds a partition this run would commit."""


class LeaseLost(ScoringError):
    """This run's lease expired and another run took it: it must not commit."""


def lease_uri(output_uri: str, date: str, product: str) -> str:
    return storage.join(output_uri, "_leases", date, quote(product, safe="") + ".json")


@functools.lru_cache(maxsize=8)
def _s3_client(endpoint: str | None, region: str | None, attempts: int):
    import boto3
    from botocore.config import Config as BotoConfig

    return boto3.client("s3", endpoint_url=endpoint, region_name=region or os.environ.get(
        "AWS_DEFAULT_REGION", "us-east-1"),
        config=BotoConfig(retries={"max_attempts": attempts, "mode": "standard"}))


def _conflict(exc: Exception) -> bool:
    code = getattr(exc, "response", {}).get("Error", {}).get("Code", "")
    return code in ("PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey", "404",
                    "412", "409")


class Lease:
    """The lease of one partition, for one run."""

    def __init__(self, uri: str, cfg: StorageConfig | None, run_id: str, ttl_s: float):
        self.uri, self.cfg, self.run_id, self.ttl_s = uri, cfg, run_id, float(ttl_s)
        self.token = secrets.token_hex(8)
        self.tag: str | None = None  # S3 ETag of our lease object / local: our token
        loc = storage.resolve(uri, cfg)
        self.s3 = loc.scheme == "s3"
        if self.s3:
            self.bucket, self.key = loc.path.split("/", 1)
        self.path = loc.path

    # ------------------------------------------------------------------ primitives
    def _doc(self) -> bytes:
        return json.dumps({"run_id": self.run_id, "token": self.token,
                           "expires_at": time.time() + self.ttl_s}).encode()

    def _client(self):
        retries = self.cfg.retries if self.cfg is not None else StorageConfig().retries
        region = self.cfg.region if self.cfg is not None else None
        return _s3_client(storage.endpoint_for(self.cfg), region, int(retries) + 1)

    def _create(self) -> bool:
        if self.s3:
            try:
                r = self._client().put_object(Bucket=self.bucket, Key=self.key,
                                              Body=self._doc(), IfNoneMatch="*")
            except Exception as exc:  # noqa: BLE001 - botocore ClientError
                if _conflict(exc):
                    return False
                raise
            self.tag = r["ETag"]
            return True
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(self._doc())
        self.tag = self.token
        return True

    def _read(self) -> tuple[dict, str] | None:
        """(document, tag) of the current lease, or None when there is none."""
        if self.s3:
            try:
                r = self._client().get_object(Bucket=self.bucket, Key=self.key)
            except Exception as exc:  # noqa: BLE001
                if getattr(exc, "response", {}).get("Error", {}).get("Code") in (
                        "NoSuchKey", "404"):
                    return None
                raise
            body, tag = r["Body"].read(), r["ETag"]
        else:
            try:
                with open(self.path, "rb") as f:
                    body = f.read()
                mtime = os.stat(self.path).st_mtime
            except FileNotFoundError:
                return None
            tag = None
        try:
            doc = json.loads(body)
        except ValueError:  # being written right now (local create), or a dead writer's
            doc = {"run_id": "?", "token": "?",
                   "expires_at": (mtime if not self.s3 else 0) + self.ttl_s}
        return doc, tag if tag is not None else str(doc.get("token"))

    def _replace(self, tag: str) -> bool:
        """Replace the lease whose tag is ``tag`` with ours (renewal or takeover)."""
        if self.s3:
            try:
                r = self._client().put_object(Bucket=self.bucket, Key=self.key,
                                              Body=self._doc(), IfMatch=tag)
            except Exception as exc:  # noqa: BLE001
                if _conflict(exc):
                    return False
                raise
            self.tag = r["ETag"]
            return True
        if tag != self.token:  # takeover: one hard link per expired token, one winner
            tomb = f"{self.path}.expired-{tag}"
            try:
                os.link(self.path, tomb)
            except (FileExistsError, FileNotFoundError):
                return False
            with open(tomb, "rb") as f:
                linked = f.read()
            try:
                linked_token = json.loads(linked).get("token")
            except ValueError:
                linked_token = "?"  # as _read names an unreadable lease
            if linked_token != tag:
                os.unlink(tomb)  # linked someone's fresh lease, not the expired one
                return False
        tmp = f"{self.path}.tmp-{uuid.uuid4().hex}"
        with open(tmp, "wb") as f:
            f.write(self._doc())
        os.replace(tmp, self.path)
        if tag != self.token:
            os.unlink(f"{self.path}.expired-{tag}")
        self.tag = self.token
        return True

    # ------------------------------------------------------------------ protocol
    def try_acquire(self) -> str | None:
        """None when this run now holds the lease, else who holds it."""
        for _ in range(3):
            if self._create():
                return None
            cur = self._read()
            if cur is None:
                continue  # released in between: try to create again
            doc, tag = cur
            if doc.get("token") == self.token:  # our own create, answered late
                self.tag = tag
                return None
            left = float(doc.get("expires_at", 0)) - time.time()
            if left > 0:
                return f"run {doc.get('run_id')} (lease expires in {left:.0f}s)"
            if self._replace(tag):
                return None
        return "another run (the lease changed hands while this run looked at it)"

    def renew(self) -> None:
        cur = self._read()
        if cur is None or cur[0].get("token") != self.token or not self._replace(cur[1]):
            raise LeaseLost(f"lease {storage.redact(self.uri)} of run {self.run_id} was lost "
                            "(expired and taken over by another run)")

    def check(self) -> None:
        cur = self._read()
        if cur is None or cur[0].get("token") != self.token or \
                float(cur[0].get("expires_at", 0)) <= time.time():
            raise LeaseLost(f"lease {storage.redact(self.uri)} of run {self.run_id} was lost")

    def release(self) -> None:
        cur = self._read()
        if cur is None or cur[0].get("token") != self.token:
            return  # not ours (any more): leave it alone
        if self.s3:
            try:
                self._client().delete_object(Bucket=self.bucket, Key=self.key, IfMatch=cur[1])
            except Exception:  # noqa: BLE001 - expires by itself
                pass
        else:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass


class PartitionLeases:
    """The leases of a run's partitions (see module doc); ``check()`` before a commit point."""

    def __init__(self, leases: list[Lease]):
        self.leases = leases
        self._stop = threading.Event()
        self._error: Exception | None = None
        self._thread = threading.Thread(target=self._renew_loop, daemon=True,
                                        name="lease-renewal")

    def _renew_loop(self) -> None:
        period = min(lease.ttl_s for lease in self.leases) / 3 if self.leases else 1.0
        while not self._stop.wait(period):
            try:
                for lease in self.leases:
                    lease.renew()
            except Exception as exc:  # noqa: BLE001 - reported by check()
                self._error = exc
                return

    def check(self) -> None:
        if self._error is not None:
            raise self._error
        for lease in self.leases:
            lease.check()


@contextmanager
def hold_partitions(output_uri: str, cfg: StorageConfig | None, date: str,
                    products: list[str], run_id: str, *, ttl_s: float, wait_s: float,
                    say: Callable[[str, str], None] | None = None) -> Iterator[PartitionLeases]:
    """Hold the leases of ``products`` of ``date`` (all or none; waits up to ``wait_s``)."""
    leases = [Lease(lease_uri(output_uri, date, p), cfg, run_id, ttl_s) for p in sorted(products)]
    deadline = time.monotonic() + max(0.0, wait_s)
    said = False
    while True:
        held: list[Lease] = []
        busy = None
        for lease in leases:
            busy = lease.try_acquire()
            if busy is not None:
                break
            held.append(lease)
        if busy is None:
            break
        for lease in held:
            lease.release()
        if time.monotonic() >= deadline:
            raise LeaseBusy(f"another run holds a partition of date {date}: {busy}; nothing "
                            f"of run {run_id} was committed")
        if say is not None and not said:
            say("score", f"waiting up to {wait_s:.0f}s: {busy} is committing date {date}")
            said = True
        time.sleep(min(POLL_S, max(0.05, deadline - time.monotonic())))
    group = PartitionLeases(leases)
    group._thread.start()
    try:
        yield group
    finally:
        group._stop.set()
        group._thread.join(timeout=30)
        for lease in leases:
            try:
                lease.release()
            except Exception:  # noqa: BLE001 - an unreleased lease expires by itself
                pass
