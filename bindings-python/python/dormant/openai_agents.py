"""OpenAI Agents SDK adapter: a sandbox client whose workspace persists between runs.

Optional extra: ``pip install "dormant[openai-agents]"``. :class:`DormantSandboxClient` is an
``agents.sandbox.session.BaseSandboxClient``: sessions it creates run in a dormant KVM-tier
sandbox, a Linux microVM (by default the ``coding`` image: Debian with bash, git, python3, pip,
node, npm, gcc), with the workspace at the manifest's root (``/workspace``). The SDK's shell,
file and ``apply_patch`` tools work on it like on its Docker client.

Its selling point is persistence without re-upload. When a session stops (``aclose()``, the end
of ``async with``, or the Runner's cleanup), the whole machine goes to standby: a snapshot on
disk, no CPU, no RAM, and the session state records its id
(:attr:`DormantSandboxSessionState.dormant_snapshot_id`). ``client.resume(state)`` wakes that
snapshot, in this process or another, with the workspace, installed packages and background
processes as they were; the SDK's workspace tarball (``persist_workspace`` /
``hydrate_workspace``) is used only where the caller asks for a portable snapshot
(``snapshot=LocalSnapshotSpec(...)``), or to rebuild a workspace whose dormant snapshot is gone::

    from agents.sandbox import Manifest
    from dormant.openai_agents import DormantSandboxClient, DormantSandboxClientOptions

    client = DormantSandboxClient()
    session = await client.create(manifest=Manifest(), options=DormantSandboxClientOptions())
    async with session:
        await session.exec("git clone ... repo && cd repo && pip install -e .")
    payload = client.serialize_session_state(session.state)     # keep it (JSON)

    state = client.deserialize_session_state(payload)            # later, any process
    async with await client.resume(state) as session:           # the clone is still there
        print((await session.exec("cd repo && pytest -q")).stdout)

With a Runner, pass ``SandboxRunConfig(client=client, options=DormantSandboxClientOptions())``
for a new session, or ``session_state=state`` to continue one.

Errors are the SDK's own: a command past its timeout is ``ExecTimeoutError``, any other
failure to run one ``ExecTransportError``; a missing file read is
``WorkspaceReadNotFoundError``, other read and write failures ``WorkspaceArchiveReadError`` /
``WorkspaceArchiveWriteError``; a dormant snapshot that is gone, with no portable snapshot to
rebuild from, is ``SnapshotRestoreError``. Each keeps dormant's exception as its cause.

Why the KVM tier: the SDK's sandbox session is a POSIX machine (it runs ``sh -lc`` commands,
shell scripts that check paths, ``tar``), which the WASI tier is not. The first sandbox on a host
boots Linux (minutes where the guest kernel is emulated); later ones resume a cached snapshot,
and ``template=`` (a built :class:`dormant.Template`) prepares a project once. PTY sessions are
not offered (``supports_pty()`` is False): the SDK then runs its shell tool without one.
"""

from __future__ import annotations

import asyncio
import io
import tarfile
import tempfile
import uuid
from pathlib import Path
from typing import Literal

from agents.sandbox.errors import (
    ExecTimeoutError,
    ExecTransportError,
    SnapshotRestoreError,
    WorkspaceArchiveReadError,
    WorkspaceArchiveWriteError,
    WorkspaceReadNotFoundError,
    WorkspaceWriteTypeError,
)
from agents.sandbox.manifest import Manifest
from agents.sandbox.session import SandboxSession, SandboxSessionState
from agents.sandbox.session.base_sandbox_session import BaseSandboxSession
from agents.sandbox.session.dependencies import Dependencies
from agents.sandbox.session.manager import Instrumentation
from agents.sandbox.session.runtime_helpers import (
    RESOLVE_WORKSPACE_PATH_HELPER,
    RuntimeHelperScript,
)
from agents.sandbox.session.sandbox_client import BaseSandboxClient, BaseSandboxClientOptions
from agents.sandbox.snapshot import SnapshotBase, SnapshotSpec, resolve_snapshot
from agents.sandbox.types import ExecResult, ExposedPortEndpoint, User
from agents.sandbox.util.tar_utils import UnsafeTarMemberError, validate_tarfile
from agents.sandbox.workspace_paths import sandbox_path_str

from ._errors import SandboxError, SandboxTimeout, SnapshotNotFound
from ._sandbox import Sandbox, StrPath

__all__ = [
    "DormantSandboxClient",
    "DormantSandboxClientOptions",
    "DormantSandboxSession",
    "DormantSandboxSessionState",
]

# Where workspace archives are staged in the guest (outside every workspace).
_STAGING = "/tmp/dormant-openai-agents"


class DormantSandboxClientOptions(BaseSandboxClientOptions):
    """Options of a new session: ``image`` (a dormant image name, default ``"coding"``), or
    ``template`` (a built KVM :class:`dormant.Template`, used instead of ``image``),
    ``memory_mib`` (guest RAM; default dormant's), ``exposed_ports`` (guest ports the SDK may
    resolve to a host address with ``session.resolve_exposed_port``)."""

    type: Literal["dormant"] = "dormant"
    image: str = "coding"
    template: str | None = None
    memory_mib: int | None = None
    exposed_ports: tuple[int, ...] = ()


class DormantSandboxSessionState(SandboxSessionState):
    """A session's state, as the SDK serializes it (JSON). ``dormant_snapshot_id`` is the
    snapshot the last stop left (None before one); ``sandbox_id`` is the dormant sandbox's id.
    The store is not part of it: it is the client's (host configuration)."""

    type: Literal["dormant"] = "dormant"
    image: str = "coding"
    template: str | None = None
    memory_mib: int | None = None
    sandbox_id: str = ""
    dormant_snapshot_id: str | None = None


class DormantSandboxSession(BaseSandboxSession):
    """A session on one dormant sandbox; made by :class:`DormantSandboxClient`."""

    state: DormantSandboxSessionState

    def __init__(self, *, state: DormantSandboxSessionState, sandbox: Sandbox) -> None:
        self.state = state
        self.sandbox = sandbox

    # --- lifecycle -------------------------------------------------------------------------

    async def _prepare_backend_workspace(self) -> None:
        root = self.state.manifest.root
        r = await asyncio.to_thread(self.sandbox.commands.run, ["mkdir", "-p", root])
        if r.exit_code != 0:
            raise WorkspaceArchiveWriteError(path=Path(root), context={"stderr": r.stderr})

    async def _persist_snapshot(self) -> None:
        """The SDK's portable snapshot (when one is configured), then standby: the machine
        sleeps on disk and :attr:`DormantSandboxSessionState.dormant_snapshot_id` names it."""
        await super()._persist_snapshot()
        self.state.dormant_snapshot_id = await asyncio.to_thread(self.sandbox.standby)

    async def _shutdown_backend(self) -> None:
        """Standby again if the sandbox ran since the last stop (nothing is lost)."""
        if self.sandbox.state == "running":
            self.state.dormant_snapshot_id = await asyncio.to_thread(self.sandbox.standby)

    async def running(self) -> bool:
        """True while the sandbox runs or sleeps in standby (a call wakes it)."""
        return self.sandbox.state in ("running", "standby")

    # --- commands --------------------------------------------------------------------------

    async def _exec_internal(
        self, *command: str | Path, timeout: float | None = None
    ) -> ExecResult:
        argv = [str(c) for c in command]
        if not argv or not argv[0]:
            raise ExecTransportError(command=command, message="empty command")
        root = self.state.manifest.root
        # In the workspace once it exists (before the manifest is applied it may not).
        cwd = root if self.state.workspace_root_ready or await self._exists(root) else None
        try:
            # The native call, for the output's exact bytes (sb.commands.run decodes them).
            out, err, code = await asyncio.to_thread(
                self.sandbox._native.exec, argv, [], cwd, timeout, None, None, False
            )
        except SandboxTimeout as e:
            raise ExecTimeoutError(command=command, timeout_s=timeout, cause=e) from e
        except SandboxError as e:
            raise ExecTransportError(command=command, cause=e,
                                     message=f"{type(e).__name__}: {e}") from e
        return ExecResult(stdout=out, stderr=err, exit_code=code)

    async def _exists(self, path: str) -> bool:
        try:
            return await asyncio.to_thread(self.sandbox.files.exists, path)
        except SandboxError:
            return False

    async def _resolve_exposed_port(self, port: int) -> ExposedPortEndpoint:
        host, _, host_port = (await asyncio.to_thread(self.sandbox.expose, port)).rpartition(":")
        return ExposedPortEndpoint(host=host, port=int(host_port))

    # --- files -----------------------------------------------------------------------------

    def _runtime_helpers(self) -> tuple[RuntimeHelperScript, ...]:
        return (RESOLVE_WORKSPACE_PATH_HELPER,)

    def _current_runtime_helper_cache_key(self) -> object | None:
        return self.state.sandbox_id

    async def _validate_path_access(self, path: Path | str, *, for_write: bool = False) -> Path:
        # Checked in the guest: a symlink in the workspace cannot lead a read or write outside.
        return await self._validate_remote_path_access(path, for_write=for_write)

    async def read(self, path: Path, *, user: str | User | None = None) -> io.IOBase:
        """The file's bytes. Raises ``WorkspaceReadNotFoundError`` when it does not exist."""
        workspace_path = await self._validate_path_access(path)
        target = sandbox_path_str(workspace_path)
        if user is not None:
            res = await self.exec("cat", "--", target, shell=False, user=user)
            if not res.ok():
                await self._raise_read_error_from_exec(
                    path=path, workspace_path=workspace_path, command=("cat", "--", target),
                    result=res, user=user,
                )
            return io.BytesIO(res.stdout)
        try:
            data = await asyncio.to_thread(self.sandbox.files.read, target)
        except FileNotFoundError as e:
            raise WorkspaceReadNotFoundError(path=path, cause=e) from e
        except (SandboxError, OSError) as e:
            raise WorkspaceArchiveReadError(path=path, cause=e) from e
        return io.BytesIO(data)

    async def write(self, path: Path, data: io.IOBase, *, user: str | User | None = None) -> None:
        """Writes the whole file (parents created)."""
        payload = data.read()
        if isinstance(payload, str):
            raise WorkspaceWriteTypeError(path=path, actual_type="str")
        if not isinstance(payload, (bytes, bytearray, memoryview)):
            raise WorkspaceWriteTypeError(path=path, actual_type=type(payload).__name__)
        workspace_path = await self._validate_path_access(path, for_write=True)
        target = sandbox_path_str(workspace_path)
        if user is not None:
            # As that user: stage the bytes, then copy them into place with the user's rights.
            staged = f"{_STAGING}/{uuid.uuid4().hex}"
            await self._write_bytes(path, staged, bytes(payload))
            res = await self.exec(
                "sh", "-c", 'mkdir -p "$(dirname "$2")" && cat "$1" > "$2"', "sh", staged, target,
                shell=False, user=user,
            )
            await asyncio.to_thread(self.sandbox.files.remove, staged)
            if not res.ok():
                raise WorkspaceArchiveWriteError(
                    path=path, context={"stderr": res.stderr.decode("utf-8", "replace")}
                )
            return
        await self._write_bytes(path, target, bytes(payload))

    async def _write_bytes(self, path: Path, target: str, data: bytes) -> None:
        try:
            await asyncio.to_thread(self.sandbox.files.write, target, data)
        except (SandboxError, OSError) as e:
            raise WorkspaceArchiveWriteError(path=path, cause=e) from e

    async def persist_workspace(self) -> io.IOBase:
        """The workspace as a tar stream with workspace-relative members (the SDK's portable
        snapshot; dormant's own persistence is the standby snapshot)."""
        root = self.state.manifest.root
        archive = f"{_STAGING}/{uuid.uuid4().hex}.tar"
        excludes = [f"--exclude=./{p.as_posix()}" for p in
                    sorted(self._persist_workspace_skip_relpaths())]
        cmd = ["sh", "-c", 'mkdir -p "$1" && shift && tar "$@"', "sh", _STAGING,
               "-C", root, "-cf", archive, *excludes, "."]
        try:
            r = await asyncio.to_thread(self.sandbox.commands.run, cmd)
            if r.exit_code != 0:
                raise WorkspaceArchiveReadError(path=Path(root), context={"stderr": r.stderr})
            data = await asyncio.to_thread(self.sandbox.files.read, archive)
            await asyncio.to_thread(self.sandbox.files.remove, archive)
        except (SandboxError, OSError) as e:
            raise WorkspaceArchiveReadError(path=Path(root), cause=e) from e
        return io.BytesIO(data)

    async def hydrate_workspace(self, data: io.IOBase) -> None:
        """Extracts a tar stream (from :meth:`persist_workspace`) under the workspace root;
        members that would leave it are refused."""
        root = self.state.manifest.root
        raw = data.read()
        if isinstance(raw, str) or not isinstance(raw, (bytes, bytearray, memoryview)):
            raise WorkspaceArchiveWriteError(path=Path(root),
                                             context={"reason": "non_bytes_tar_payload"})
        with tempfile.TemporaryFile() as f:
            f.write(raw)
            f.seek(0)
            try:
                with tarfile.open(fileobj=f, mode="r:*") as tar:
                    validate_tarfile(tar, allow_external_symlink_targets=False)
            except UnsafeTarMemberError as e:
                raise WorkspaceArchiveWriteError(
                    path=Path(root), context={"reason": e.reason, "member": e.member}, cause=e
                ) from e
            except (tarfile.TarError, OSError) as e:
                raise WorkspaceArchiveWriteError(path=Path(root), cause=e) from e
        archive = f"{_STAGING}/{uuid.uuid4().hex}.tar"
        try:
            await asyncio.to_thread(self.sandbox.files.write, archive, bytes(raw))
            r = await asyncio.to_thread(
                self.sandbox.commands.run,
                ["sh", "-c", 'mkdir -p "$1" && tar -xf "$2" -C "$1"', "sh", root, archive],
            )
            await asyncio.to_thread(self.sandbox.files.remove, archive)
        except (SandboxError, OSError) as e:
            raise WorkspaceArchiveWriteError(path=Path(root), cause=e) from e
        if r.exit_code != 0:
            raise WorkspaceArchiveWriteError(path=Path(root), context={"stderr": r.stderr})


class DormantSandboxClient(BaseSandboxClient[DormantSandboxClientOptions | None]):
    """Creates and resumes :class:`DormantSandboxSession` s.

    ``store``: the dormant snapshot store (default: :func:`dormant.default_store`); host
    configuration, so it is the client's and not in the serialized session state.
    ``idle_standby``: seconds idle before a running sandbox sleeps by itself (dormant's
    default 15; None: never). ``instrumentation`` and ``dependencies`` as for the SDK's
    clients."""

    backend_id = "dormant"
    supports_default_options = True

    def __init__(
        self,
        *,
        store: StrPath | None = None,
        idle_standby: float | None = 15.0,
        instrumentation: Instrumentation | None = None,
        dependencies: Dependencies | None = None,
    ) -> None:
        super().__init__()
        self.store = store
        self.idle_standby = idle_standby
        self._instrumentation = (
            instrumentation if instrumentation is not None else Instrumentation()
        )
        self._dependencies = dependencies

    async def create(
        self,
        *,
        snapshot: SnapshotSpec | SnapshotBase | None = None,
        manifest: Manifest | None = None,
        options: DormantSandboxClientOptions | None = None,
    ) -> SandboxSession:
        """A new sandbox (``options.template``, else ``options.image``) for a new session;
        the session applies ``manifest`` when it starts. Raises dormant's errors
        (:class:`dormant.KvmUnavailable` where the KVM tier cannot run, ...)."""
        opts = options if options is not None else DormantSandboxClientOptions()
        manifest = manifest if manifest is not None else Manifest()
        self._validate_manifest_for_create(manifest)
        sandbox = await asyncio.to_thread(self._new_sandbox, opts.image, opts.template,
                                          opts.memory_mib)
        session_id = uuid.uuid4()
        state = DormantSandboxSessionState(
            session_id=session_id,
            manifest=manifest,
            snapshot=resolve_snapshot(snapshot, str(session_id)),
            exposed_ports=opts.exposed_ports,
            image=opts.image,
            template=opts.template,
            memory_mib=opts.memory_mib,
            sandbox_id=sandbox.id,
        )
        inner = DormantSandboxSession(state=state, sandbox=sandbox)
        return self._wrap_session(inner, instrumentation=self._instrumentation)

    def _new_sandbox(self, image: str, template: str | None, memory_mib: int | None) -> Sandbox:
        if template is not None:
            return Sandbox.create("kvm", template=template, store=self.store,
                                  memory_mib=memory_mib, idle_standby=self.idle_standby)
        return Sandbox.create(image=image, store=self.store, memory_mib=memory_mib,
                              idle_standby=self.idle_standby)

    async def resume(self, state: SandboxSessionState) -> SandboxSession:
        """The session of ``state``: its dormant snapshot resumed, workspace and processes as
        they were (the SDK then skips restoring and re-applying the manifest). Where that
        snapshot is gone but ``state.snapshot`` is a restorable portable snapshot, a new
        sandbox is created and the SDK restores the workspace into it; with neither,
        ``SnapshotRestoreError``."""
        if not isinstance(state, DormantSandboxSessionState):
            raise TypeError("DormantSandboxClient.resume expects a DormantSandboxSessionState")
        state.assert_path_grants_rebound()
        sandbox: Sandbox | None = None
        missing: SnapshotNotFound | None = None
        if state.dormant_snapshot_id is not None:
            try:
                sandbox = await asyncio.to_thread(
                    Sandbox.resume, state.dormant_snapshot_id, store=self.store,
                    idle_standby=self.idle_standby,
                )
            except SnapshotNotFound as e:
                missing = e
        preserved = sandbox is not None
        if sandbox is None:
            if not await state.snapshot.restorable(dependencies=self._resolve_dependencies()):
                raise SnapshotRestoreError(
                    snapshot_id=state.dormant_snapshot_id or "(none)",
                    path=Path(state.manifest.root),
                    cause=missing,
                )
            sandbox = await asyncio.to_thread(self._new_sandbox, state.image, state.template,
                                              state.memory_mib)
            state.sandbox_id = sandbox.id
            state.workspace_root_ready = False
        inner = DormantSandboxSession(state=state, sandbox=sandbox)
        inner._set_start_state_preserved(preserved)
        return self._wrap_session(inner, instrumentation=self._instrumentation)

    async def delete(self, session: SandboxSession) -> SandboxSession:
        """Ends the session's sandbox for good. Its snapshots stay in the store, so a state
        whose ``dormant_snapshot_id`` was recorded (every stopped session's) still resumes;
        remove them with :func:`dormant.delete_snapshot`."""
        inner = session._inner
        if not isinstance(inner, DormantSandboxSession):
            raise TypeError("DormantSandboxClient.delete expects a DormantSandboxSession")
        if inner.sandbox.state != "killed":
            await asyncio.to_thread(inner.sandbox.kill)
        return session

    def deserialize_session_state(self, payload: dict[str, object]) -> SandboxSessionState:
        return self._deserialize_session_state_payload(payload, DormantSandboxSessionState)
