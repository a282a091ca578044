"""The public surface on the KVM tier (Linux microVMs). Skipped, with the reason shown, only
where this host has no usable /dev/kvm."""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys
import threading
import time
import urllib.request

import pytest

import dormant


def make(kvm_store: pathlib.Path, **kw: object) -> dormant.Sandbox:
    kw.setdefault("idle_standby", None)
    # busybox's httpd, wget and applets: the tests of the tier's calls use the smallest image.
    kw.setdefault("image", "minimal")
    kw.setdefault("memory_mib", 128)
    # Generous: guest kernel code may be emulated (PVM hosts) on a busy machine.
    kw.setdefault("timeout", 300)
    return dormant.Sandbox.create("kvm", store=kvm_store, **kw)  # type: ignore[arg-type]


def test_image_implies_the_kvm_tier(kvm_store: pathlib.Path) -> None:
    sb = dormant.Sandbox.create(
        image="minimal", store=kvm_store, memory_mib=128, timeout=300, idle_standby=None
    )
    assert sb.tier == "kvm"
    assert sb.commands.run("echo $((6 * 7))").stdout == "42\n"
    sb.kill()


def test_commands(kvm_store: pathlib.Path) -> None:
    sb = make(kvm_store)
    assert sb.tier == "kvm" and sb.state == "running"
    r = sb.commands.run("echo hello; echo oops >&2; exit 3")
    assert isinstance(r, dormant.CommandResult)
    assert (r.stdout, r.stderr, r.exit_code) == ("hello\n", "oops\n", 3)
    r = sb.commands.run(["sh", "-c", 'echo "$GREETING from $(pwd)"'], env={"GREETING": "hi"}, cwd="/tmp")
    assert r.stdout == "hi from /tmp\n"
    chunks: list[str] = []
    r = sb.commands.run("for i in 1 2 3; do echo $i; done", on_stdout=chunks.append)
    assert "".join(chunks) == r.stdout == "1\n2\n3\n"
    with pytest.raises(dormant.SandboxTimeout):
        sb.commands.run("sleep 30", timeout=0.5)
    assert sb.commands.run("echo still usable").stdout == "still usable\n"
    # Background commands.
    h = sb.commands.run("sleep 0.2; echo done in the background", background=True)
    assert isinstance(h, dormant.CommandHandle) and h.pid > 0
    res = h.wait(timeout=120)
    assert (res.stdout, res.exit_code) == ("done in the background\n", 0)
    h = sb.commands.run("sleep 1000", background=True)
    assert isinstance(h, dormant.CommandHandle)
    with pytest.raises(dormant.SandboxTimeout):
        h.wait(timeout=0.1)
    h.kill()
    assert h.wait(timeout=120).exit_code == 128 + 9
    # The minimal image has no python3: run_code names an image that has it.
    with pytest.raises(dormant.Unsupported, match='image="coding"'):
        sb.run_code("print(1)")


def answers_within(sb: dormant.Sandbox, cmd: str, seconds: float) -> str | None:
    """The stdout of ``cmd``, or ``None`` if the sandbox did not answer within ``seconds``
    (the call then goes on in a daemon thread)."""
    out: list[str] = []
    t = threading.Thread(target=lambda: out.append(sb.commands.run(cmd).stdout), daemon=True)
    t.start()
    t.join(seconds)
    return out[0] if out else None


@pytest.mark.usefixtures("sigint_raises")
def test_ctrl_c_stops_a_command_and_the_sandbox_answers(kvm_store: pathlib.Path) -> None:
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signals reach only the main thread")
    sb = make(kvm_store)
    pids: list[str] = []
    started = threading.Event()

    def on_stdout(chunk: str) -> None:
        pids.append(chunk)
        started.set()

    def ctrl_c_once_started() -> None:
        if started.wait(300):
            os.kill(os.getpid(), signal.SIGINT)

    ctrl_c = threading.Thread(target=ctrl_c_once_started)
    ctrl_c.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            sb.commands.run("echo $$; exec sleep 600", on_stdout=on_stdout)
    finally:
        started.set()
        ctrl_c.join()
    pid = int("".join(pids))
    # The sandbox is not held by the interrupted command (before, the next call waited for the
    # command's timeout), and the command was killed in the guest.
    gone = f"while kill -0 {pid} 2>/dev/null; do sleep 0.1; done; echo gone"
    assert answers_within(sb, gone, 120) == "gone\n"
    assert sb.state == "running"


def test_output_past_the_limit_raises_and_stops_the_command(kvm_store: pathlib.Path) -> None:
    sb = make(kvm_store, output_limit=65536)
    # Before, the streamed output was collected without a limit until the command's timeout.
    with pytest.raises(dormant.LimitExceeded):
        sb.commands.run("echo $$ > /tmp/yes.pid; exec yes", timeout=120)
    gone = "p=$(cat /tmp/yes.pid); while kill -0 $p 2>/dev/null; do sleep 0.1; done; echo gone"
    assert sb.commands.run(gone).stdout == "gone\n"
    chunks: list[str] = []
    r = sb.commands.run("yes | head -c 65536", on_stdout=chunks.append)
    assert r.stdout == "".join(chunks) == "y\n" * 32768


def test_files_and_volumes(kvm_store: pathlib.Path, tmp_path: pathlib.Path) -> None:
    vol = tmp_path / "vol"
    vol.mkdir()
    (vol / "from-host.txt").write_text("host data\n")
    sb = make(kvm_store, volumes={"/mnt/vol": vol})
    sb.files.write("/root/a.txt", "text")
    assert sb.files.read_text("/root/a.txt") == "text"
    assert sb.commands.run("cat /root/a.txt").stdout == "text"
    assert [e.name for e in sb.files.list("/root")] == ["a.txt"]
    assert sb.files.exists("/root/a.txt")
    sb.files.remove("/root/a.txt")
    assert not sb.files.exists("/root/a.txt")
    with pytest.raises(FileNotFoundError):
        sb.files.read("/root/a.txt")
    assert sb.files.read_text("/mnt/vol/from-host.txt") == "host data\n"
    sb.commands.run("echo from the guest > /mnt/vol/guest.txt")
    assert (vol / "guest.txt").read_text() == "from the guest\n"
    # A snapshot grants no host directory: a resume gives the volume again.
    snap = sb.standby()
    with pytest.raises(dormant.InvalidArgument, match="/mnt/vol"):
        dormant.Sandbox.resume(snap, store=kvm_store)
    again = dormant.Sandbox.resume(snap, store=kvm_store, volumes={"/mnt/vol": vol}, idle_standby=None)
    assert again.commands.run("cat /mnt/vol/guest.txt").stdout == "from the guest\n"
    # The sandbox in standby wakes with the volume it was created with.
    assert sb.files.read_text("/mnt/vol/from-host.txt") == "host data\n"


def test_lifecycle_and_a_fresh_process(kvm_store: pathlib.Path) -> None:
    with make(kvm_store) as sb:
        sb.files.write("/root/state.txt", "before")
        # The counter is replaced by a rename, never truncated in place: a reader must never
        # see it empty (`echo $i > /root/count` truncates first, and a concurrent read got '').
        sb.commands.run(
            "i=0; while true; do i=$((i+1)); echo $i > /root/count.new;"
            " mv /root/count.new /root/count; sleep 1; done",
            background=True,
        )
        # The loop has started (a guest fork+exec can take a second where it is emulated).
        deadline = time.monotonic() + 120
        while not sb.files.exists("/root/count") and time.monotonic() < deadline:
            time.sleep(0.2)
        assert sb.files.exists("/root/count")
        snap = sb.checkpoint()
        assert sb.state == "running"
        kids = sb.fork(1)
        kids[0].files.write("/root/state.txt", "kid")
        assert sb.files.read_text("/root/state.txt") == "before"
    assert sb.state == "standby" and sb.snapshot_id is not None
    assert snap in {s.id for s in dormant.list_snapshots(kvm_store) if s.tier == "kvm"}
    code = (
        "import sys, time, dormant\n"
        "sb = dormant.Sandbox.resume(sys.argv[1], store=sys.argv[2], idle_standby=None)\n"
        "a = int(sb.files.read_text('/root/count'))\n"
        "t = time.monotonic()\n"
        "while int(sb.files.read_text('/root/count')) <= a and time.monotonic() - t < 120:\n"
        "    time.sleep(0.5)\n"
        "print(sb.files.read_text('/root/state.txt'), int(sb.files.read_text('/root/count')) > a)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, sb.snapshot_id, str(kvm_store)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout == "before True\n"
    sb.kill()
    assert sb.state == "killed"
    with pytest.raises(dormant.InvalidState):
        sb.commands.run("true")


def fetch(addr: str, path: str) -> bytes:
    """GET ``path`` from the host address ``addr`` ("127.0.0.1:N")."""
    with urllib.request.urlopen(f"http://{addr}{path}", timeout=300) as r:
        body: bytes = r.read()
        return body


def test_expose_serves_a_guest_server_wakes_a_sleeping_sandbox_and_comes_back(
    kvm_store: pathlib.Path,
) -> None:
    sb = make(kvm_store, idle_standby=2)
    sb.files.write("/var/www/index.html", "hello from the guest\n")
    sb.commands.run("httpd -f -p 127.0.0.1:8080 -h /var/www", background=True)
    deadline = time.monotonic() + 300
    while "hello" not in sb.commands.run("wget -qO- http://127.0.0.1:8080/index.html").stdout:
        assert time.monotonic() < deadline, "httpd did not start"
        time.sleep(0.2)
    addr = sb.expose(8080)
    assert addr.startswith("127.0.0.1:") and addr != "127.0.0.1:0"
    assert sb.get_host(8080) == addr
    assert sb.exposed == {8080: addr}
    assert fetch(addr, "/index.html") == b"hello from the guest\n"
    with pytest.raises(dormant.InvalidArgument):
        sb.expose(0)
    with pytest.raises(TypeError):
        sb.expose("8080")  # type: ignore[arg-type]
    # Asleep by itself, the sandbox still listens: a request wakes it and is served.
    deadline = time.monotonic() + 300
    while sb.state != "standby":
        assert time.monotonic() < deadline, "no auto-standby"
        time.sleep(0.1)
    assert fetch(addr, "/index.html") == b"hello from the guest\n"
    assert sb.state == "running"
    # A fork exposes nothing.
    kids = sb.fork(1)
    assert kids[0].exposed == {}
    kids[0].kill()
    # The port is part of the sandbox: resumed in another process, it answers again.
    snap = sb.standby()
    sb.kill()
    code = (
        "import sys, urllib.request, dormant\n"
        "sb = dormant.Sandbox.resume(sys.argv[1], store=sys.argv[2], idle_standby=None)\n"
        "addr = sb.exposed[8080]\n"
        "print(urllib.request.urlopen(f'http://{addr}/index.html', timeout=300).read().decode())\n"
        "sb.unexpose(8080)\n"
        "print(sb.exposed)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, snap, str(kvm_store)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout == "hello from the guest\n\n{}\n"
