"""Snapshots in an S3-compatible object store (dormant.Store) against a real SeaweedFS on
127.0.0.1: resume on another host (another process, another cache), one host at a time per
sandbox (its lease) with fencing, a failed upload reported and retried, and deduplication of a
template's chunks across sandboxes."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator

import pytest

import dormant
from conftest import KVM_OK, KVM_WHY
from seaweed import SeaweedFS

HOST = pathlib.Path(__file__).parent / "remote_host.py"
# Credentials the usual way; SeaweedFS without an IAM configuration accepts any.
CREDS = {"AWS_ACCESS_KEY_ID": "dormant-test", "AWS_SECRET_ACCESS_KEY": "dormant-test-secret"}


@pytest.fixture(scope="module")
def seaweed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedFS]:
    s = SeaweedFS(tmp_path_factory.mktemp("seaweedfs"))
    yield s
    s.stop()


@pytest.fixture(autouse=True)
def credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    for k, v in CREDS.items():
        monkeypatch.setenv(k, v)


def prefix() -> str:
    return f"t-{uuid.uuid4().hex[:12]}"


def host_args(
    seaweed: SeaweedFS, url: str, cache: pathlib.Path, **kw: object
) -> dict[str, object]:
    return {"url": url, "endpoint": seaweed.endpoint, "cache": str(cache), **kw}


def run_host(action: str, args: dict[str, object], timeout: float = 900) -> dict[str, object]:
    """Runs one host to the end; returns its last JSON line."""
    p = subprocess.run(
        [sys.executable, str(HOST), action, json.dumps(args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **CREDS},
    )
    assert p.returncode == 0, f"host {action} failed:\n{p.stdout}\n{p.stderr}"
    result: dict[str, object] = json.loads(p.stdout.strip().splitlines()[-1])
    return result


def start_host(action: str, args: dict[str, object]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(HOST), action, json.dumps(args)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **CREDS},
    )


def read_line(p: subprocess.Popen[str]) -> dict[str, object]:
    assert p.stdout is not None
    line = p.stdout.readline()
    assert line, f"host ended without answering: {p.stderr.read() if p.stderr else ''}"
    result: dict[str, object] = json.loads(line)
    return result


@pytest.mark.timeout(600)
def test_a_python_session_resumes_on_another_host(
    seaweed: SeaweedFS, tmp_path: pathlib.Path
) -> None:
    url = seaweed.url(prefix())
    a = run_host("create", host_args(seaweed, url, tmp_path / "a", tier="wasi"))
    # Host B: another process, an empty cache.
    b = run_host("check", host_args(seaweed, url, tmp_path / "b", id=a["id"]))
    assert b["value"] == "42 6"
    assert b["notes"] == "from host A"
    store = dormant.Store(url, endpoint_url=seaweed.endpoint, cache_dir=tmp_path / "c")
    head = store.head(str(a["id"]))
    assert head is not None and head["holder"] is None, "B's standby released the lease"
    listed = {s.id: s for s in dormant.list_snapshots(store)}
    assert a["snapshot"] in listed and head["snapshot"] in listed
    assert listed[str(a["snapshot"])].tier == "wasi"


@pytest.mark.timeout(1800)
def test_a_linux_sandbox_resumes_on_another_host(
    seaweed: SeaweedFS, tmp_path: pathlib.Path
) -> None:
    if not KVM_OK:
        pytest.skip(f"SKIPPED: the KVM tier cannot run here: {KVM_WHY}")
    url = seaweed.url(prefix())
    a = run_host("create", host_args(seaweed, url, tmp_path / "a", tier="kvm"), timeout=1700)
    b = run_host("check", host_args(seaweed, url, tmp_path / "b", id=a["id"]), timeout=1700)
    assert b["notes"] == "from host A"
    assert b["value"] == "running", "the background process kept running across hosts"


@pytest.mark.timeout(600)
def test_one_host_at_a_time_and_a_stale_holder_is_fenced(
    seaweed: SeaweedFS, tmp_path: pathlib.Path
) -> None:
    url = seaweed.url(prefix())
    ttl = 3.0
    a = run_host("create", host_args(seaweed, url, tmp_path / "a", tier="wasi", ttl=ttl))
    # Two hosts resume the sandbox at the same moment: exactly one gets it.
    at = time.time() + 3
    hosts = [
        start_host("hold", host_args(seaweed, url, tmp_path / n, id=a["id"], ttl=ttl, at=at))
        for n in ("h1", "h2")
    ]
    first = [read_line(h) for h in hosts]
    assert sorted(bool(f["held"]) for f in first) == [False, True], first
    winner = hosts[[bool(f["held"]) for f in first].index(True)]
    loser = first[[bool(f["held"]) for f in first].index(False)]
    assert loser["error"] == "SandboxBusy"
    assert "running on another host" in str(loser["message"])
    try:
        # The holder hangs (stopped): its lease expires, and another host takes over.
        os.kill(winner.pid, signal.SIGSTOP)
        took = run_host(
            "take", host_args(seaweed, url, tmp_path / "h3", id=a["id"], ttl=ttl, within=120)
        )
        assert took["value"] == "41", "the new holder resumed the last durable state"
        # The old holder comes back: its checkpoint is refused, never overwriting.
        os.kill(winner.pid, signal.SIGCONT)
        assert winner.stdin is not None
        winner.stdin.write("checkpoint\n")
        winner.stdin.flush()
        answer = read_line(winner)
        assert answer["checkpoint"] == "LeaseLost", answer
        winner.stdin.write("exit\n")
        winner.stdin.flush()
        winner.wait(timeout=60)
    finally:
        if winner.poll() is None:
            os.kill(winner.pid, signal.SIGCONT)
        for h in hosts:
            if h.poll() is None:
                h.kill()
                h.wait()
    # The head still names the take-over's state.
    after = run_host("take", host_args(seaweed, url, tmp_path / "h4", id=a["id"], within=60))
    assert after["value"] == "B took over"


@pytest.mark.timeout(600)
def test_a_failed_upload_is_reported_and_a_retry_succeeds(tmp_path: pathlib.Path) -> None:
    # A SeaweedFS of its own, stopped in the middle of the test.
    weed = SeaweedFS(tmp_path / "seaweedfs")
    try:
        url = weed.url(prefix())
        store = dormant.Store(
            url,
            endpoint_url=weed.endpoint,
            cache_dir=tmp_path / "a",
            retries=0,
        )
        sb = dormant.Sandbox.create("wasi", store=store)
        sb.run_code("import pandas as pd\nx = 41\ndf = pd.DataFrame({'a': [1, 2, 3]})")
        sb.files.write("/data/notes.txt", "from host A")
        weed.stop()
        with pytest.raises(dormant.RemoteStoreError) as e:
            sb.standby(durable=True)
        assert "object store" in str(e.value)
        # Nothing local was lost: the snapshot is in the local store.
        local = [s.id for s in dormant.list_snapshots(store.cache_dir)]
        assert sb.snapshot_id in local
        weed.start()
        snap = sb.standby(durable=True)  # the retry
        assert snap in local
        head = store.head(sb.id)
        assert head is not None and head["snapshot"] == snap
        b = run_host(
            "check",
            {"url": url, "endpoint": weed.endpoint, "cache": str(tmp_path / "b"), "id": sb.id},
        )
        assert b["value"] == "42 6"
    finally:
        weed.stop()


@pytest.mark.timeout(600)
def test_a_host_killed_during_an_upload_loses_nothing_durable(
    seaweed: SeaweedFS, tmp_path: pathlib.Path
) -> None:
    url = seaweed.url(prefix())
    ttl = 3.0
    a = start_host("crash", host_args(seaweed, url, tmp_path / "a", ttl=ttl))
    try:
        first = read_line(a)
        read_line(a)  # the large standby is committed locally; its upload has started
        a.kill()  # kill -9, mid-upload
        a.wait()
    finally:
        if a.poll() is None:
            a.kill()
    store = dormant.Store(url, endpoint_url=seaweed.endpoint, cache_dir=tmp_path / "c")
    head = store.head(str(first["id"]))
    assert head is not None
    # The head names the durable snapshot or, if the upload finished, the later one, and
    # never a snapshot with anything missing.
    assert head["snapshot"] is not None
    snapshots, chunks = store.verify(str(head["snapshot"]))
    assert snapshots >= 1 and chunks >= 1
    # A grace period under twice freshen_after is refused (an upload under way could lose
    # a chunk it reuses).
    with pytest.raises(dormant.InvalidArgument):
        store.gc(grace=60)
    # GC with a short grace period (freshen_after 1 s): what the head references stays;
    # what a partial upload left goes once older than the grace period.
    quick = dormant.Store(
        url, endpoint_url=seaweed.endpoint, cache_dir=tmp_path / "d", freshen_after=1
    )
    report = quick.gc(grace=2)
    assert report["snapshots"] >= 1
    store.verify(str(head["snapshot"]))
    # Another host takes over once the dead host's lease expires, with the durable state.
    took = run_host(
        "take", host_args(seaweed, url, tmp_path / "b", id=first["id"], ttl=ttl, within=120)
    )
    assert took["value"] == "41"


@pytest.mark.timeout(900)
def test_sandboxes_from_one_template_store_its_chunks_once(
    seaweed: SeaweedFS, tmp_path: pathlib.Path
) -> None:
    url = seaweed.url(prefix())
    store = dormant.Store(url, endpoint_url=seaweed.endpoint, cache_dir=tmp_path / "a")
    dormant.Template(
        "numbers", tier="wasi", run=["import numpy as np\nbig = np.arange(2_000_000)"]
    ).build(store)

    def chunk_bytes() -> tuple[int, int]:
        chunks = [b for k, b in store.objects() if k.startswith("chunks/")]
        return len(chunks), sum(chunks)

    sizes = []
    for i in range(10):
        sb = dormant.Sandbox.create(template="numbers", store=store)
        sb.run_code(f"mine = {i}")
        sb.standby(durable=True)
        sizes.append(chunk_bytes())
    first_count, first_bytes = sizes[0]
    count, total = sizes[-1]
    snapshots = [k for k, _ in store.objects() if k.startswith("snapshots/")]
    heads = [k for k, _ in store.objects() if k.startswith("heads/")]
    assert len(heads) == 10
    # Each sandbox's own snapshot, plus the template's chain, stored once.
    assert 11 <= len(snapshots) <= 13, snapshots
    # The template's chunks (the array alone is 16 MB) are in the bucket once: the nine
    # later sandboxes added only their own few changed chunks each.
    per_sandbox = (total - first_bytes) / 9
    assert per_sandbox < first_bytes / 20, (sizes, per_sandbox)
    assert count - first_count < 9 * 64, sizes


@pytest.mark.timeout(600)
def test_a_template_built_on_one_host_serves_another(
    seaweed: SeaweedFS, tmp_path: pathlib.Path
) -> None:
    url = seaweed.url(prefix())
    store = dormant.Store(url, endpoint_url=seaweed.endpoint, cache_dir=tmp_path / "a")
    dormant.Template("shared", tier="wasi", run=["prepared = 'on host A'"]).build(store)
    b = run_host(
        "from_template", host_args(seaweed, url, tmp_path / "b", template="shared")
    )
    assert b["value"] == "on host A"
    assert any(k == "records/template/shared" for k, _ in store.objects())


@pytest.mark.timeout(300)
def test_a_killed_sandbox_is_not_found_on_any_host(
    seaweed: SeaweedFS, tmp_path: pathlib.Path
) -> None:
    url = seaweed.url(prefix())
    store = dormant.Store(url, endpoint_url=seaweed.endpoint, cache_dir=tmp_path / "a")
    sb = dormant.Sandbox.create("wasi", store=store)
    sb.run_code("x = 41")
    snap = sb.checkpoint(durable=True)
    sb.kill()
    head = store.head(sb.id)
    assert head is not None and head["killed_unix_ms"] is not None and head["holder"] is None
    with pytest.raises(dormant.SandboxNotFound):
        dormant.Sandbox.connect(sb.id, store=store)
    b = subprocess.run(
        [sys.executable, "-c", CONNECT, url, seaweed.endpoint, str(tmp_path / "b"), sb.id],
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, **CREDS},
    )
    assert b.stdout.strip() == "SandboxNotFound", b.stderr
    # Its snapshots stay, resumable by snapshot id; a checkpoint after the kill brings the
    # sandbox back.
    again = dormant.Sandbox.resume(snap, store=store)
    assert again.run_code("print(x)").stdout == "41\n"
    again.standby(durable=True)  # the lease released once uploaded
    assert dormant.Sandbox.connect(sb.id, store=store).run_code("print(x)").stdout == "41\n"


CONNECT = """
import sys, dormant
url, endpoint, cache, sid = sys.argv[1:]
try:
    dormant.Sandbox.connect(sid, store=dormant.Store(url, endpoint_url=endpoint, cache_dir=cache))
    print("found")
except dormant.SandboxNotFound:
    print("SandboxNotFound")
"""


def test_a_missing_bucket_is_a_clear_error(seaweed: SeaweedFS, tmp_path: pathlib.Path) -> None:
    with pytest.raises(dormant.RemoteStoreError) as e:
        dormant.Store(
            "s3://no-such-bucket/x", endpoint_url=seaweed.endpoint, cache_dir=tmp_path / "a"
        )
    assert "does not exist" in str(e.value)


def test_unknown_and_malformed_sandbox_ids_are_not_found(
    seaweed: SeaweedFS, tmp_path: pathlib.Path
) -> None:
    store = dormant.Store(
        seaweed.url(prefix()), endpoint_url=seaweed.endpoint, cache_dir=tmp_path / "a"
    )
    for sid in ["sb-0000000000000000", "../etc", "", "a/b"]:
        with pytest.raises(dormant.SandboxNotFound):
            dormant.Sandbox.connect(sid, store=store)
    assert store.head("sb-0000000000000000") is None


def test_store_arguments_are_checked(tmp_path: pathlib.Path) -> None:
    with pytest.raises(dormant.InvalidArgument):
        dormant.Store("/not/a/url")
    with pytest.raises(dormant.InvalidArgument):
        dormant.Store("s3://b/p", lease_ttl=-1, cache_dir=tmp_path)
    with pytest.raises(TypeError):
        dormant.list_snapshots(store=42)  # type: ignore[arg-type]
