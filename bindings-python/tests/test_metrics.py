"""``Sandbox.metrics()`` and ``dormant.store_usage()`` on the WASI tier: the shapes, that the
figures move with what the guest does, a sandbox in standby read without waking it, and the
snapshot bytes a template's sandbox shares."""

from __future__ import annotations

import dataclasses
import pathlib

import pytest

import dormant


def test_metrics_move_with_what_the_guest_does(store: pathlib.Path) -> None:
    sb = dormant.Sandbox.create(store=store, idle_standby=None)
    m0 = sb.metrics()
    assert isinstance(m0, dormant.Metrics)
    assert isinstance(m0.cpu_time_s, float)
    assert 0 < m0.memory_bytes <= m0.memory_limit_bytes
    assert m0.snapshots == 0 and m0.snapshot_bytes_stored == 0 and m0.snapshot_bytes_shared == 0
    with pytest.raises(dataclasses.FrozenInstanceError):
        m0.memory_bytes = 0  # type: ignore[misc]

    sb.run_code("big = list(range(4_000_000))\nprint(sum(i * i for i in range(1_000_000)) > 0)")
    sb.run_code("open('/tmp/out.bin', 'wb').write(b'q' * 2_000_000)")
    m1 = sb.metrics()
    assert m1.cpu_time_s > m0.cpu_time_s
    assert m1.memory_bytes >= m0.memory_bytes + 30_000_000  # 4 M list slots: 32 MB
    assert m1.disk_bytes_written >= m0.disk_bytes_written + 2_000_000

    sb.standby()
    asleep = sb.metrics()
    assert sb.state == "standby", "metrics do not wake the sandbox"
    assert asleep.memory_bytes == 0
    assert asleep.cpu_time_s >= m1.cpu_time_s
    assert asleep.disk_bytes_written == m1.disk_bytes_written
    assert asleep.snapshots == 1 and asleep.snapshot_bytes_stored > 0
    sb.kill()


def test_store_usage_and_a_template_sandboxs_shared_bytes(store: pathlib.Path) -> None:
    empty = dormant.store_usage(store=store)
    assert empty == dormant.StoreUsage(0, 0, 0, 0, 0, 0)

    dormant.Template("metrics", run=["base = list(range(100_000))"]).build(store=store)
    sb = dormant.Sandbox.create(template="metrics", store=store, idle_standby=None)
    sb.run_code("mine = bytes(1_000_000)")
    sb.checkpoint()
    m = sb.metrics()
    assert m.snapshots == 1
    assert m.snapshot_bytes_stored > 0
    assert m.snapshot_bytes_shared > 0, "the template's snapshot is shared"

    u = dormant.store_usage(store=store)
    assert isinstance(u, dormant.StoreUsage)
    assert u.snapshots == 2 and u.sandboxes == 2
    assert u.bytes_on_disk >= m.snapshot_bytes_stored + m.snapshot_bytes_shared
    assert u.logical_bytes > 0
    sb.kill()
