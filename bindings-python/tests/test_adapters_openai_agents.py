"""The OpenAI Agents SDK adapter (dormant.openai_agents), driven through the session methods the
SDK's tools and Runner call: create, start (manifest applied), exec, read, write, ls, stop,
serialize/deserialize of the session state, resume, delete. No model and no network.

Persistence: a workspace made in one run (a manifest file changed, a file written, a git
commit) is there after the session stops (standby) and a new client resumes its serialized
state; the manifest is not applied again. Then the SDK's portable snapshot: with the dormant
snapshot gone from the state, resume rebuilds the workspace in a new sandbox from the tarball.

KVM sandboxes on the `coding` image (skipped, with the reason, where the KVM tier cannot run;
the session's KVM store boots Linux once)."""

from __future__ import annotations

import asyncio
import io
import json
import pathlib
from pathlib import Path

import pytest
from agents.sandbox import LocalSnapshotSpec, Manifest
from agents.sandbox.entries import File
from agents.sandbox.errors import (
    ExecTimeoutError,
    InvalidManifestPathError,
    SnapshotRestoreError,
    WorkspaceReadNotFoundError,
)
from agents.sandbox.session import SandboxSession

from dormant.openai_agents import (
    DormantSandboxClient,
    DormantSandboxClientOptions,
    DormantSandboxSessionState,
)

pytestmark = pytest.mark.timeout(1200)


async def _text(session: SandboxSession, path: str) -> str:
    stream = await session.read(Path(path))
    data = stream.read()
    assert isinstance(data, bytes)
    return data.decode()


async def first_run(client: DormantSandboxClient, snapshots: pathlib.Path) -> dict[str, object]:
    manifest = Manifest(entries={"README.md": File(content=b"from the manifest\n")})
    session = await client.create(
        manifest=manifest,
        options=DormantSandboxClientOptions(image="coding"),
        snapshot=LocalSnapshotSpec(base_path=snapshots),
    )
    async with session:
        assert await _text(session, "README.md") == "from the manifest\n"
        r = await session.exec("pwd; echo err >&2; exit 3")
        assert (r.stdout, r.stderr, r.exit_code) == (b"/workspace\n", b"err\n", 3)

        await session.write(Path("notes/today.txt"), io.BytesIO(b"first run"))
        await session.write(Path("README.md"), io.BytesIO(b"changed by the agent\n"))
        names = sorted(e.path.rsplit("/", 1)[-1] for e in await session.ls("."))
        assert names == ["README.md", "notes"]
        with pytest.raises(WorkspaceReadNotFoundError):
            await session.read(Path("missing.txt"))
        with pytest.raises(InvalidManifestPathError):
            await session.read(Path("../etc/passwd"))
        with pytest.raises(ExecTimeoutError):
            await session.exec("sleep 60", timeout=1)

        commit = await session.exec(
            "git init -q && git add -A && "
            "git -c user.name=agent -c user.email=agent@example.com commit -qm 'first run'"
        )
        assert commit.exit_code == 0, commit.stderr
    # Stopped: the machine is in standby and the state names its snapshot.
    state = session.state
    assert isinstance(state, DormantSandboxSessionState)
    assert state.dormant_snapshot_id is not None
    payload = client.serialize_session_state(state)
    await client.delete(session)
    return payload


async def second_run(client: DormantSandboxClient, payload: dict[str, object]) -> str:
    state = client.deserialize_session_state(payload)
    async with await client.resume(state) as session:
        # The agent's change to README.md stands: the manifest was not applied again.
        assert await _text(session, "README.md") == "changed by the agent\n"
        assert await _text(session, "notes/today.txt") == "first run"
        log = await session.exec("git log --format=%s")
        assert log.stdout == b"first run\n"
        state = session.state
        assert isinstance(state, DormantSandboxSessionState)
        sandbox_id = state.sandbox_id
    await client.delete(session)
    return sandbox_id


async def rebuild_from_tarball(client: DormantSandboxClient, payload: dict[str, object]) -> str:
    payload = dict(payload, dormant_snapshot_id=None)
    state = client.deserialize_session_state(payload)
    async with await client.resume(state) as session:
        assert await _text(session, "notes/today.txt") == "first run"
        assert await _text(session, "README.md") == "changed by the agent\n"
        state = session.state
        assert isinstance(state, DormantSandboxSessionState)
        sandbox_id = state.sandbox_id
    await client.delete(session)
    return sandbox_id


def test_workspace_persists_across_stop_and_resume(
    kvm_store: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    client = DormantSandboxClient(store=kvm_store)
    payload = asyncio.run(first_run(client, tmp_path))
    payload = json.loads(json.dumps(payload))  # as an application would keep it

    # A new client, as in a new process.
    original = payload["sandbox_id"]
    assert asyncio.run(second_run(DormantSandboxClient(store=kvm_store), payload)) == original

    # The SDK's portable snapshot is the fallback: a new sandbox, hydrated from the tarball.
    rebuilt = asyncio.run(rebuild_from_tarball(DormantSandboxClient(store=kvm_store), payload))
    assert rebuilt != original

    # Neither a dormant snapshot nor a portable one: the SDK's restore error.
    bare = dict(payload, dormant_snapshot_id=None, snapshot={"type": "noop", "id": "x"})
    with pytest.raises(SnapshotRestoreError):
        asyncio.run(DormantSandboxClient(store=kvm_store).resume(
            DormantSandboxClient(store=kvm_store).deserialize_session_state(bare)))
