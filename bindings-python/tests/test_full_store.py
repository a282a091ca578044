"""A store on a filesystem that fills up (issue 11): a checkpoint fails with `StoreFull`, the
session runs on (touching fresh memory too) and loses nothing; the next checkpoint after space
is freed resumes in a new Python process with everything. Mounting the small tmpfs needs root
(CI runs as root); elsewhere the test is skipped with the reason shown."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
from collections.abc import Iterator

import pytest

import dormant

MIB = 1 << 20


@pytest.fixture
def small_tmpfs(tmp_path: pathlib.Path) -> Iterator[pathlib.Path]:
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs for the store needs root")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=384m", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(mnt: pathlib.Path) -> pathlib.Path:
    """Takes every free byte of the filesystem (a file written until ENOSPC)."""
    filler = mnt / "filler"
    chunk = b"\xab" * MIB
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(chunk)
                f.flush()
        except OSError:
            pass
    return filler


def in_new_process(
    snap: str, store: pathlib.Path, body: str, *args: str, timeout: float
) -> str:
    """Resumes `snap` of `store` as `sb` in a new Python process, runs `body` there (with
    `args` from `sys.argv[3]` on; the process may take `timeout` seconds) and returns what it
    printed."""
    code = (
        "import sys, dormant\n"
        "sb = dormant.Sandbox.resume(sys.argv[1], store=sys.argv[2], idle_standby=None)\n" + body
    )
    out = subprocess.run(
        [sys.executable, "-c", code, snap, str(store), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


@pytest.mark.timeout(900)
def test_a_full_store_raises_store_full_and_loses_nothing(small_tmpfs: pathlib.Path) -> None:
    store = small_tmpfs / "store"
    sb = dormant.Sandbox.create("wasi", store=store, idle_standby=None)
    sb.run_code("before = bytes(range(256)) * 4096\nopen('/tmp/a.txt', 'w').write('kept')")
    sb.checkpoint()
    sb.run_code("between = [i * i for i in range(200_000)]")
    filler = fill(small_tmpfs)
    with pytest.raises(dormant.StoreFull) as info:
        sb.checkpoint()
    assert "store is full" in str(info.value)
    assert isinstance(info.value, dormant.SandboxError)
    assert sb.state == "running"
    # The session answers, fresh memory included (pages of the mapped image that are holes).
    ex = sb.run_code("fresh = bytearray(range(256)) * 40000\nprint(len(before), fresh[255])")
    assert ex.error is None, ex.error
    assert ex.stdout == "1048576 255\n"
    filler.unlink()
    sb.run_code("after = sum(between)")
    snap = sb.checkpoint()
    body = (
        "print(sb.run_code(\"print(len(before), before[-1], sum(between) == after, "
        "open('/tmp/a.txt').read())\").stdout, end='')\n"
    )
    assert in_new_process(snap, store, body, timeout=600) == "1048576 255 True kept\n"


@pytest.mark.timeout(1500)
def test_a_full_store_on_the_kvm_tier_raises_store_full_and_loses_nothing(
    small_tmpfs: pathlib.Path, kvm_store: pathlib.Path
) -> None:
    # A Linux sandbox whose snapshots live on the small filesystem: its first snapshot (a delta
    # on the base snapshot every sandbox starts from) and that base are copied there, holes
    # kept, so that no second guest boots.
    first = dormant.Sandbox.create(
        "kvm", store=kvm_store, image="minimal", idle_standby=None, memory_mib=128, timeout=300
    )
    snap = first.standby()
    bases = [
        p
        for p in (kvm_store / "bases").iterdir()
        if "-128m-" in p.name and not p.name.endswith(".lock")
    ]
    assert len(bases) == 1, bases
    base = bases[0].read_text().strip()
    store = small_tmpfs / "store"
    (store / "snapshots").mkdir(parents=True)
    for sid in (base, snap):
        src = str(kvm_store / "snapshots" / sid)
        subprocess.run(["cp", "-r", "--sparse=always", src, str(store / "snapshots")], check=True)
    sb = dormant.Sandbox.resume(snap, store=store, idle_standby=None)
    check = "md5sum /tmp/a /data/a /tmp/b /data/b"
    write = "seq {0} {1} > /tmp/{2} && seq {0} {1} > /data/{2} && sync"
    assert sb.commands.run(write.format(1, 100_000, "a")).exit_code == 0
    filler = fill(small_tmpfs)
    with pytest.raises(dormant.StoreFull) as info:
        sb.checkpoint()
    assert "store is full" in str(info.value)
    assert sb.state == "running"
    assert sb.commands.run("echo still here").stdout == "still here\n"
    filler.unlink()
    assert sb.commands.run(write.format(200_000, 300_000, "b")).exit_code == 0
    sums = sb.commands.run(check).stdout
    snap = sb.checkpoint()
    body = "print(sb.commands.run(sys.argv[3]).stdout, end='')\n"
    assert in_new_process(snap, store, body, check, timeout=900) == sums
