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
    code = (
        "import sys, dormant\n"
        "sb = dormant.Sandbox.resume(sys.argv[1], store=sys.argv[2])\n"
        "print(sb.run_code(\"print(len(before), before[-1], sum(between) == after, "
        "open('/tmp/a.txt').read())\").stdout, end='')\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, snap, str(store)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout == "1048576 255 True kept\n"
