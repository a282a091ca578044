"""The Deep Agents adapter (dormant.deepagents.DormantSandbox), driven through the methods Deep
Agents' tools call: execute, write, edit, read, ls, grep, glob, upload_files, download_files.
No model and no network. Persistence: a project written and committed in one run is there, with
its git history, after standby and a resume through a new backend.

One KVM sandbox on the `coding` image (skipped, with the reason, where the KVM tier cannot run;
the session's KVM store boots Linux once)."""

from __future__ import annotations

import pathlib

import pytest
from deepagents.backends.protocol import FILE_NOT_FOUND, IS_DIRECTORY, INVALID_PATH
from deepagents.backends.sandbox import BaseSandbox

import dormant
from dormant.deepagents import DormantSandbox

# Generous: the session's first KVM sandbox boots Linux (minutes where the guest kernel is
# emulated).
pytestmark = pytest.mark.timeout(1200)


def test_workspace_persists_across_standby_and_resume(kvm_store: pathlib.Path) -> None:
    backend = DormantSandbox(store=kvm_store, cwd="/root")
    assert isinstance(backend, BaseSandbox)
    assert backend.id

    r = backend.execute("echo out; echo err >&2; exit 3")
    assert r.exit_code == 3
    assert r.output == "out\n\n[stderr] err\n\nExit code: 3"
    assert backend.execute("pwd").output == "/root\n"

    # Deep Agents' file tools.
    assert backend.write("/root/proj/app.py", "def greet():\n    return 'hello'\n").error is None
    edit = backend.edit("/root/proj/app.py", "'hello'", "'hello, world'")
    assert edit.error is None and edit.occurrences == 1
    read = backend.read("/root/proj/app.py")
    assert read.error is None and read.file_data is not None
    assert "hello, world" in read.file_data["content"]
    ls = backend.ls("/root/proj")
    assert ls.entries is not None and [e["path"] for e in ls.entries] == ["/root/proj/app.py"]
    grep = backend.grep("greet", path="/root/proj")
    assert grep.matches is not None and grep.matches[0]["path"] == "/root/proj/app.py"
    glob = backend.glob("*.py", path="/root/proj")
    assert glob.matches is not None and len(glob.matches) == 1

    # Binary files both ways; per-file errors with Deep Agents' codes.
    blob = bytes(range(256))
    up = backend.upload_files([("/root/proj/data.bin", blob), ("relative.txt", b"x")])
    assert [u.error for u in up] == [None, INVALID_PATH]
    down = backend.download_files(["/root/proj/data.bin", "/root/nope.txt", "/root/proj"])
    assert down[0].content == blob
    assert [d.error for d in down] == [None, FILE_NOT_FOUND, IS_DIRECTORY]

    # A command past its timeout is killed and reported as exit code 124.
    slow = backend.execute("sleep 60", timeout=1)
    assert slow.exit_code == 124 and "timed out" in slow.output

    commit = backend.execute(
        "cd /root/proj && git init -q && git add app.py && "
        "git -c user.name=agent -c user.email=agent@example.com commit -qm 'first run'"
    )
    assert commit.exit_code == 0, commit.output
    snap = backend.standby()
    assert backend.snapshot_id == snap

    # The next agent run: a new backend resumes the snapshot; nothing is re-uploaded.
    again = DormantSandbox(snapshot_id=snap, store=kvm_store)
    assert again.id == backend.id
    read = again.read("/root/proj/app.py")
    assert read.file_data is not None and "hello, world" in read.file_data["content"]
    assert again.execute("git -C /root/proj log --format=%s").output == "first run\n"
    assert again.download_files(["/root/proj/data.bin"])[0].content == blob
    again.kill()


@pytest.mark.timeout(120)
def test_bad_arguments_are_refused(store: pathlib.Path) -> None:
    # Runs without KVM: every check happens before a microVM would be created.
    with pytest.raises(dormant.InvalidArgument, match="positive"):
        DormantSandbox(store=store, timeout=0)
    with pytest.raises(dormant.InvalidArgument, match="at most one"):
        DormantSandbox(store=store, snapshot_id="s", template="t")
    # A Python session's snapshot has no shell.
    with dormant.Sandbox.create(store=store) as py:
        pass
    assert py.snapshot_id is not None
    with pytest.raises(dormant.InvalidArgument, match="kvm tier"):
        DormantSandbox(store=store, snapshot_id=py.snapshot_id)
