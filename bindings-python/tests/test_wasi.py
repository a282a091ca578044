"""The public surface on the WASI tier (Python sessions)."""

from __future__ import annotations

import datetime as dt
import json
import os
import pathlib
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Callable
from typing import Any

import pytest

import dormant


def make(store: pathlib.Path, **kw: object) -> dormant.Sandbox:
    kw.setdefault("idle_standby", None)
    return dormant.Sandbox.create("wasi", store=store, **kw)  # type: ignore[arg-type]


def test_run_code_keeps_state_and_returns_exceptions(store: pathlib.Path) -> None:
    sb = make(store)
    assert sb.tier == "wasi" and sb.state == "running" and sb.id
    ex = sb.run_code("x = 41\nprint(x + 1)")
    assert (ex.stdout, ex.stderr, ex.error) == ("42\n", "", None)
    ex = sb.run_code("import sys; sys.stderr.write('warn\\n'); 1 / 0")
    assert ex.stderr.startswith("warn\n")
    assert ex.error is not None
    assert ex.error.name == "ZeroDivisionError"
    assert "division by zero" in ex.error.value
    assert "ZeroDivisionError" in ex.error.traceback
    assert sb.run_code("print(x)").stdout == "41\n", "state survives an exception"


def test_commands_run_wasi_programs(store: pathlib.Path, hello_wasm: bytes) -> None:
    sb = make(store)
    sb.files.write("/bin/hello.wasm", hello_wasm)
    r = sb.commands.run("/bin/hello.wasm")
    assert isinstance(r, dormant.CommandResult)
    assert (r.stdout, r.stderr, r.exit_code) == ("hello from wasi\n", "oops\n", 3)
    out: list[str] = []
    err: list[str] = []
    r = sb.commands.run(["/bin/hello.wasm", "arg"], on_stdout=out.append, on_stderr=err.append)
    assert r.exit_code == 3
    assert "".join(out) == "hello from wasi\n" and "".join(err) == "oops\n"
    with pytest.raises(dormant.SandboxFileNotFoundError):
        sb.commands.run("/bin/missing.wasm")
    with pytest.raises(dormant.Unsupported):
        sb.commands.run("/bin/hello.wasm", background=True)
    with pytest.raises(dormant.Unsupported):
        sb.commands.run("/bin/hello.wasm", cwd="/tmp")
    # WASI preview 1 has no sockets: no ports to expose.
    with pytest.raises(dormant.Unsupported):
        sb.expose(8080)
    with pytest.raises(dormant.Unsupported):
        sb.exposed


def test_files(store: pathlib.Path) -> None:
    sb = make(store)
    sb.files.write("/work/a.txt", "text")
    sb.files.write("/work/b.bin", b"\x00\x01")
    sb.files.write("/work/sub/c", bytearray(b"c"))
    assert sb.files.read("/work/a.txt") == b"text"
    assert sb.files.read_text("/work/a.txt") == "text"
    assert sb.files.read("/work/b.bin") == b"\x00\x01"
    entries = sb.files.list("/work")
    assert [(e.name, e.is_dir) for e in entries] == [
        ("a.txt", False),
        ("b.bin", False),
        ("sub", True),
    ]
    assert entries[0].size == 4
    assert sb.files.exists("/work/a.txt") and not sb.files.exists("/work/zzz")
    sb.files.remove("/work/sub")
    assert not sb.files.exists("/work/sub/c")
    assert sb.run_code("print(open('/work/a.txt').read())").stdout == "text\n"
    with pytest.raises(FileNotFoundError) as e:
        sb.files.read("/work/zzz")
    assert isinstance(e.value, dormant.SandboxError) and e.value.errno == 2
    with pytest.raises(dormant.PathEscape):
        sb.files.read("/../../etc/passwd")
    with pytest.raises(PermissionError):
        sb.files.write("/work/../../escape.txt", "x")


def test_checkpoint_standby_resume_fork_kill(store: pathlib.Path) -> None:
    sb = make(store)
    sb.run_code("n = 1")
    snap = sb.checkpoint()
    assert sb.snapshot_id == snap and sb.state == "running"
    sb.run_code("n = 2")
    stand = sb.standby()
    assert sb.state == "standby" and sb.snapshot_id == stand
    # A call wakes it, exactly where it stopped.
    assert sb.run_code("print(n)").stdout == "2\n"
    assert sb.state == "running"
    # The older snapshot resumes as it was.
    old = dormant.Sandbox.resume(snap, store=store, idle_standby=None)
    assert old.id == sb.id and old.run_code("print(n)").stdout == "1\n"
    kids = sb.fork(2)
    assert len(kids) == 2 and len({k.id for k in kids} | {sb.id}) == 3
    kids[0].run_code("n = 'kid0'")
    assert kids[1].run_code("print(n)").stdout == "2\n"
    assert sb.run_code("print(n)").stdout == "2\n"
    sb.kill()
    assert sb.state == "killed"
    with pytest.raises(dormant.InvalidState):
        sb.run_code("1")


def test_context_manager_goes_to_standby(store: pathlib.Path) -> None:
    with make(store) as sb:
        sb.run_code("kept = 'yes'")
    assert sb.state == "standby" and sb.snapshot_id is not None
    again = dormant.Sandbox.resume(sb.snapshot_id, store=store)
    assert again.run_code("print(kept)").stdout == "yes\n"


def test_a_session_resumes_in_a_fresh_python_process(store: pathlib.Path) -> None:
    sb = make(store)
    ex = sb.run_code(
        "import pandas as pd\n"
        "df = pd.DataFrame({'a': range(1000)})\n"
        "df['b'] = df.a * 2\n"
        "total = int(df.b.sum())\n"
    )
    assert ex.error is None, ex.error
    snap = sb.standby()
    code = (
        "import sys, dormant\n"
        "sb = dormant.Sandbox.resume(sys.argv[1], store=sys.argv[2])\n"
        "print(sb.run_code('print(total, df.shape, df.b.iloc[-1])').stdout, end='')\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, snap, str(store)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout == "999000 (1000, 2) 1998\n"


def test_list_and_delete_snapshots(store: pathlib.Path) -> None:
    sb = make(store)
    before = dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=5)
    snap = sb.checkpoint()
    infos = {s.id: s for s in dormant.list_snapshots(store)}
    assert snap in infos
    info = infos[snap]
    assert info.tier == "wasi" and info.bytes_stored > 0 and info.created > before
    sb.kill()
    dormant.delete_snapshot(snap, store=store)
    assert snap not in {s.id for s in dormant.list_snapshots(store)}
    with pytest.raises(dormant.SnapshotNotFound):
        dormant.Sandbox.resume(snap, store=store)
    with pytest.raises(dormant.SnapshotNotFound):
        dormant.delete_snapshot(snap, store=store)


def test_default_store_is_dormant_home(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = tmp_path / "home"
    monkeypatch.setenv("DORMANT_HOME", str(home))
    assert dormant.default_store() == str(home)
    sb = dormant.Sandbox.create(idle_standby=None)
    assert sb.store == str(home)
    snap = sb.checkpoint()
    assert snap in {s.id for s in dormant.list_snapshots()}
    monkeypatch.delenv("DORMANT_HOME")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert dormant.default_store() == str(tmp_path / "xdg" / "dormant")


def test_volumes(store: pathlib.Path, tmp_path: pathlib.Path) -> None:
    shared = tmp_path / "shared"
    ref = tmp_path / "ref"
    shared.mkdir()
    ref.mkdir()
    (ref / "r.txt").write_text("reference")
    sb = make(store, volumes={"/shared": shared, "/ref": dormant.Volume(ref, read_only=True)})
    sb.files.write("/shared/out.txt", "from the sandbox")
    assert (shared / "out.txt").read_text() == "from the sandbox"
    assert sb.files.read_text("/ref/r.txt") == "reference"
    with pytest.raises(dormant.ReadOnly):
        sb.files.write("/ref/new.txt", "x")
    snap = sb.standby()
    (shared / "out.txt").write_text("changed by the host")
    again = dormant.Sandbox.resume(
        snap, store=store, volumes={"/shared": shared, "/ref": dormant.Volume(ref, read_only=True)}
    )
    assert again.files.read_text("/shared/out.txt") == "changed by the host"


def _forge(manifest: pathlib.Path, edit: Callable[[Any], None]) -> None:
    """Rewrites a snapshot's manifest as a forger would: ``edit`` changes its metadata, and
    every checksum is computed again (CRC-32 of each section and of the file, as the format's
    documentation says), so the store reads it as a valid snapshot."""
    data = manifest.read_bytes()
    assert data[:8] == b"DRMNTSNP"
    (count,) = struct.unpack_from("<I", data, 12)
    at, sections = 16, []
    for _ in range(count):
        tag = data[at : at + 4]
        (n,) = struct.unpack_from("<Q", data, at + 4)
        sections.append((tag, data[at + 16 : at + 16 + n]))
        at += 16 + n
    assert sections[0][0] == b"META"
    meta = json.loads(sections[0][1])
    edit(meta)
    sections[0] = (b"META", json.dumps(meta).encode())
    out = bytearray(data[:16])
    for tag, payload in sections:
        out += tag + struct.pack("<QI", len(payload), zlib.crc32(payload)) + payload
    out += b"DEND" + struct.pack("<I", zlib.crc32(bytes(out)))
    manifest.write_bytes(bytes(out))


def test_a_snapshot_never_grants_a_host_directory(
    store: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    shared = tmp_path / "shared"
    secret = tmp_path / "secret"
    shared.mkdir()
    secret.mkdir()
    (shared / "mine.txt").write_text("mine")
    (secret / "secret.txt").write_text("top secret")
    sb = make(store, volumes={"/shared": shared})
    sb.run_code("kept = 'session state'")
    snap = sb.standby()
    manifest = store / "snapshots" / snap / "manifest.dsnp"
    assert str(shared).encode() not in manifest.read_bytes(), "no host directory is recorded"

    def point_at_secret(meta: Any) -> None:
        for m in meta["spec"]["mounts"]:
            m["host"] = str(secret)

    _forge(manifest, point_at_secret)
    assert str(secret).encode() in manifest.read_bytes()

    # Without volumes: an error naming the mount point.
    with pytest.raises(dormant.InvalidArgument, match="/shared"):
        dormant.Sandbox.resume(snap, store=store)
    # Detached: an empty, read-only directory; the session and its other files work.
    d = dormant.Sandbox.resume(snap, store=store, detach_missing=True, idle_standby=None)
    assert d.files.list("/shared") == []
    ex = d.run_code(
        "import os\nprint(os.listdir('/shared'), kept)\n"
        "open('/tmp/t.txt', 'w').write('own files')\nprint(open('/tmp/t.txt').read())"
    )
    assert (ex.stdout, ex.error) == ("[] session state\nown files\n", None)
    assert d.run_code("open('/shared/planted.txt', 'w')").error is not None
    with pytest.raises(dormant.ReadOnly):
        d.files.write("/shared/planted.txt", "x")
    d.kill()

    # With the volume given again: as before, and kept through auto-standby and wake.
    again = dormant.Sandbox.resume(snap, store=store, volumes={"/shared": shared}, idle_standby=0.2)
    ex = again.run_code("print(open('/shared/mine.txt').read(), kept)")
    assert ex.stdout == "mine session state\n"
    deadline = time.monotonic() + 60
    while again.state != "standby" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert again.state == "standby"
    assert again.run_code("print(open('/shared/mine.txt').read())").stdout == "mine\n"
    # Forks get the parent's volumes; the context manager still puts it in standby.
    (kid,) = again.fork(1)
    kid.files.write("/shared/from-kid.txt", "kid")
    assert (shared / "from-kid.txt").read_text() == "kid"
    with again:
        again.files.write("/shared/in-block.txt", "block")
    assert again.state == "standby"
    assert again.files.read_text("/shared/in-block.txt") == "block", "wakes with its volume"
    assert sorted(os.listdir(secret)) == ["secret.txt"], "the secret directory was never touched"
    with pytest.raises(dormant.InvalidArgument, match="/elsewhere"):
        dormant.Sandbox.resume(snap, store=store, volumes={"/shared": shared, "/elsewhere": shared})
    with pytest.raises(TypeError):
        dormant.Sandbox.resume(snap, store=store, detach_missing="yes")  # type: ignore[arg-type]


def test_idle_sandboxes_go_to_standby_and_wake_on_use(store: pathlib.Path) -> None:
    sb = make(store, idle_standby=0.2)
    sb.run_code("v = 'still here'")
    deadline = time.monotonic() + 60
    while sb.state != "standby" and time.monotonic() < deadline:
        time.sleep(0.1)
    assert sb.state == "standby"
    assert sb.run_code("print(v)").stdout == "still here\n"
    assert sb.state == "running"


def test_a_call_past_its_timeout_is_stopped(store: pathlib.Path) -> None:
    sb = make(store)
    sb.run_code("kept = 1")
    good = sb.checkpoint()
    with pytest.raises(dormant.SandboxTimeout) as e:
        sb.run_code("while True: pass", timeout=0.5)
    assert isinstance(e.value, TimeoutError)
    assert sb.state == "poisoned"
    with pytest.raises(dormant.InvalidState):
        sb.run_code("1")
    again = dormant.Sandbox.resume(good, store=store)
    assert again.run_code("print(kept)").stdout == "1\n"


def test_memory_cap(store: pathlib.Path) -> None:
    sb = make(store, memory_mib=96)
    try:
        ex = sb.run_code("hog = bytearray(512 << 20)")
    except dormant.LimitExceeded:
        assert sb.state == "poisoned"
    else:
        # CPython may turn the refused growth into a MemoryError the session survives.
        assert ex.error is not None and ex.error.name == "MemoryError"
        assert sb.run_code("print('alive')").stdout == "alive\n"


def test_a_corrupted_snapshot_is_refused(store: pathlib.Path) -> None:
    sb = make(store)
    snap = sb.checkpoint()
    sb.kill()
    manifest = next(store.glob(f"snapshots/{snap}/manifest.dsnp"))
    data = bytearray(manifest.read_bytes())
    data[len(data) // 2] ^= 0xFF
    manifest.write_bytes(bytes(data))
    with pytest.raises(dormant.SnapshotCorrupt):
        dormant.Sandbox.resume(snap, store=store)


def test_environment_variables(store: pathlib.Path) -> None:
    sb = make(store, env={"GREETING": "hi"})
    assert sb.run_code("import os; print(os.environ['GREETING'])").stdout == "hi\n"
