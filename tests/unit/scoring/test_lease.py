"""Partition leases (one committer per partition) on local storage and on the loopback S3
server: exclusive create, expiry and takeover, renewal, loss, waiting and giving up."""

from __future__ import annotations

import threading
import time

import pytest
from helpers import new_bucket

from prn_ray.scoring import lease as sl


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "scores")
    return new_bucket(request.getfixturevalue("s3_endpoint"), "lease") + "/scores"


def test_one_holder_expiry_takeover_and_loss(root):
    uri = sl.lease_uri(root, "2024-05-01", "fabric")
    a = sl.Lease(uri, None, "run-a", ttl_s=1.0)
    b = sl.Lease(uri, None, "run-b", ttl_s=1.0)
    assert a.try_acquire() is None
    assert a.try_acquire() is None  # re-entrant for its holder
    busy = b.try_acquire()
    assert busy is not None and "run-a" in busy
    a.renew()
    a.check()
    time.sleep(1.2)  # a stops renewing (a dead run): b takes over once it expired
    assert b.try_acquire() is None
    with pytest.raises(sl.LeaseLost):
        a.check()
    with pytest.raises(sl.LeaseLost):
        a.renew()
    a.release()  # not a's any more: left alone
    b.check()
    b.release()
    assert a.try_acquire() is None


def test_concurrent_acquire_has_one_winner(tmp_path):
    """Local storage only: moto_server checks If-None-Match and then writes without a lock, so
    two simultaneous conditional PUTs can both succeed there (real S3 decides atomically);
    the S3 path's create-if-absent is checked one request at a time above."""
    uri = sl.lease_uri(str(tmp_path / "scores"), "2024-05-01", "p")
    leases = [sl.Lease(uri, None, f"run-{i}", ttl_s=30) for i in range(6)]
    results: list = [None] * len(leases)
    barrier = threading.Barrier(len(leases))

    def go(i):
        barrier.wait()
        results[i] = leases[i].try_acquire()

    threads = [threading.Thread(target=go, args=(i,)) for i in range(len(leases))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(r is None for r in results) == 1, results


def test_hold_partitions_waits_then_gives_up(root):
    said = []
    with sl.hold_partitions(root, None, "2024-05-01", ["b", "a"], "run-1", ttl_s=0.6,
                            wait_s=0) as held:
        time.sleep(1.0)  # longer than the ttl: the renewal thread keeps the leases alive
        held.check()
        t0 = time.monotonic()
        with pytest.raises(sl.LeaseBusy, match="run-1"):
            with sl.hold_partitions(root, None, "2024-05-01", ["a"], "run-2", ttl_s=5,
                                    wait_s=0.5, say=lambda *a: said.append(a)):
                pass
        assert time.monotonic() - t0 >= 0.5 and said
    # released at exit: the next run gets both at once
    with sl.hold_partitions(root, None, "2024-05-01", ["a", "b"], "run-3", ttl_s=5,
                            wait_s=0) as held:
        held.check()
