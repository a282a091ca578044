"""LangChain Deep Agents adapter: a sandbox backend whose workspace persists between runs.

Optional extra: ``pip install "dormant[deepagents]"``. :class:`DormantSandbox` is a
``deepagents.backends.sandbox.BaseSandbox`` (so a ``SandboxBackendProtocol``): the agent's
``execute`` tool runs shell commands in a dormant KVM-tier sandbox, a Linux microVM (by default
the ``coding`` image: Debian with bash, git, python3, pip, node, npm, gcc), and Deep Agents' file
tools (``ls``, ``read_file``, ``write_file``, ``edit_file``, ``grep``, ``glob``) work on its
filesystem. Its selling point is persistence: :meth:`DormantSandbox.standby` puts the whole
machine to sleep on disk (files, installed packages, running dev servers) and returns a snapshot
id; a backend made later with ``snapshot_id=`` (in this process or another) wakes it where it
stopped, instead of re-creating the workspace and re-uploading files::

    from deepagents import create_deep_agent
    from dormant.deepagents import DormantSandbox

    backend = DormantSandbox()                         # a new microVM (image="coding")
    agent = create_deep_agent(model=..., backend=backend)
    agent.invoke({"messages": [{"role": "user", "content": "clone the repo and run its tests"}]})
    snap = backend.standby()                           # keep `snap`

    backend = DormantSandbox(snapshot_id=snap)         # tomorrow: the clone is still there
    agent = create_deep_agent(model=..., backend=backend)

Errors follow Deep Agents' conventions: ``execute`` never raises for a command's failure, a
timeout or a sandbox error; it returns an ``ExecuteResponse`` whose output says what happened
(exit code 124 for a timeout, as ``LocalShellBackend`` does). ``upload_files`` and
``download_files`` report per-file errors with Deep Agents' ``FileOperationError`` codes
(``file_not_found``, ``permission_denied``, ``is_directory``, ``invalid_path``).

Why the KVM tier: a Deep Agents sandbox backend is a shell (``execute``) plus files, and its
file tools run ``python3`` and POSIX tools in the sandbox; the WASI tier has neither a shell nor
processes. The first sandbox on a host boots Linux (minutes where the guest kernel is emulated);
later ones resume a cached snapshot, and a :class:`dormant.Template` prepares a project once.
"""

from __future__ import annotations

from deepagents.backends.protocol import (
    FILE_NOT_FOUND,
    INVALID_PATH,
    IS_DIRECTORY,
    PERMISSION_DENIED,
    ExecuteResponse,
    FileDownloadResponse,
    FileUploadResponse,
)
from deepagents.backends.sandbox import BaseSandbox

from ._adapter import Persistent, open_sandbox
from ._errors import InvalidArgument, LimitExceeded, SandboxError, SandboxTimeout
from ._sandbox import Sandbox, StrPath

__all__ = ["DormantSandbox"]

# Deep Agents' own default for LocalShellBackend.execute.
DEFAULT_TIMEOUT = 120.0
# Output an LLM is shown from one command (more is cut, with truncated=True).
DEFAULT_MAX_OUTPUT_BYTES = 100_000


def _file_error(e: BaseException) -> str:
    """Deep Agents' code for a failed file transfer, else the error as text."""
    if isinstance(e, FileNotFoundError):
        return FILE_NOT_FOUND
    if isinstance(e, IsADirectoryError):
        return IS_DIRECTORY
    if isinstance(e, PermissionError):
        return PERMISSION_DENIED
    if isinstance(e, (InvalidArgument, NotADirectoryError, TypeError)):
        return INVALID_PATH
    return f"{type(e).__name__}: {e}"


class DormantSandbox(Persistent, BaseSandbox):
    """A Deep Agents sandbox backend on a dormant KVM-tier sandbox.

    - ``snapshot_id``: resume this snapshot (from :meth:`standby` or :meth:`checkpoint`).
    - ``template``: create the sandbox from a built KVM :class:`dormant.Template` (a project
      cloned and its dependencies installed once).
    - ``sandbox``: use this running KVM :class:`dormant.Sandbox` as it is.
    - otherwise a new sandbox on ``image`` (default ``"coding"``).
    - ``store``: the snapshot store (default: :func:`dormant.default_store`); ``memory_mib``:
      guest RAM for a new sandbox.
    - ``cwd``: the directory commands run in (default: the guest agent's); ``timeout``: default
      seconds per command (Deep Agents may pass its own; ``0`` there means no limit);
      ``max_output_bytes``: output shown per command, the rest cut (``truncated=True``).

    :attr:`snapshot_id`, :meth:`checkpoint` and :meth:`standby` are the machine's.

    Raises :class:`dormant.InvalidArgument` for conflicting arguments or a WASI sandbox,
    :class:`dormant.KvmUnavailable` where the KVM tier cannot run, and dormant's errors for a
    snapshot that cannot be resumed."""

    def __init__(
        self,
        *,
        snapshot_id: str | None = None,
        template: str | None = None,
        sandbox: Sandbox | None = None,
        image: str = "coding",
        store: StrPath | None = None,
        memory_mib: int | None = None,
        cwd: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        max_output_bytes: int = DEFAULT_MAX_OUTPUT_BYTES,
    ) -> None:
        if not timeout > 0:
            raise InvalidArgument(f"timeout must be a positive number of seconds, not {timeout}")
        if max_output_bytes <= 0:
            raise InvalidArgument(f"max_output_bytes must be positive, not {max_output_bytes}")
        self.sandbox = open_sandbox("kvm", snapshot_id=snapshot_id, template=template,
                                    sandbox=sandbox, store=store, image=image,
                                    memory_mib=memory_mib)
        self.cwd = cwd
        self.timeout = float(timeout)
        self.max_output_bytes = max_output_bytes

    @property
    def id(self) -> str:
        """The dormant sandbox's id (kept across standby and resume)."""
        return self.sandbox.id

    def kill(self) -> None:
        """Ends the sandbox for good (its snapshots stay in the store)."""
        self.sandbox.kill()

    def execute(self, command: str, *, timeout: int | None = None) -> ExecuteResponse:
        """Runs ``command`` with the guest's bash. ``output`` is stdout, then stderr with each
        line prefixed ``[stderr]`` (as ``LocalShellBackend`` does), then ``Exit code: N`` when
        it is not 0. Never raises for the command: a timeout is exit code 124, a sandbox error
        exit code 1, each with a message for the model."""
        if not command or not isinstance(command, str):
            return ExecuteResponse(output="Error: Command must be a non-empty string.",
                                   exit_code=1)
        if timeout is not None and timeout < 0:
            return ExecuteResponse(
                output=f"Error: timeout must be a non-negative number of seconds, not {timeout}.",
                exit_code=1,
            )
        # None: the backend's default; 0: no limit (as Deep Agents' protocol allows).
        limit = self.timeout if timeout is None else float(timeout) if timeout > 0 else None
        try:
            r = self.sandbox.commands.run(command, timeout=limit, cwd=self.cwd)
        except SandboxTimeout:
            return ExecuteResponse(
                output=f"Error: Command timed out after {limit} seconds and was killed. For "
                "long-running commands, re-run with a larger timeout or in the background "
                "(`cmd > log 2>&1 &`).",
                exit_code=124,
            )
        except LimitExceeded as e:
            return ExecuteResponse(
                output=f"Error: the command's output went past the sandbox's limit and it was "
                f"killed ({e}). Redirect large output to a file and read parts of it.",
                exit_code=1,
                truncated=True,
            )
        except SandboxError as e:
            return ExecuteResponse(output=f"Error: the sandbox failed: {type(e).__name__}: {e}",
                                   exit_code=1)
        parts = [r.stdout] if r.stdout else []
        if r.stderr:
            parts.extend(f"[stderr] {line}" for line in r.stderr.strip().split("\n"))
        output = "\n".join(parts) if parts else "<no output>"
        truncated = False
        raw = output.encode("utf-8")
        if len(raw) > self.max_output_bytes:
            output = raw[: self.max_output_bytes].decode("utf-8", errors="ignore")
            output += f"\n\n... Output truncated at {self.max_output_bytes} bytes."
            truncated = True
        if r.exit_code != 0:
            output = f"{output.rstrip()}\n\nExit code: {r.exit_code}"
        return ExecuteResponse(output=output, exit_code=r.exit_code, truncated=truncated)

    def upload_files(self, files: list[tuple[str, bytes]]) -> list[FileUploadResponse]:
        """Writes each ``(absolute path, bytes)``, parents created; per-file errors."""
        responses = []
        for path, content in files:
            try:
                self.sandbox.files.write(path, content)
                responses.append(FileUploadResponse(path=path))
            except (SandboxError, OSError, TypeError) as e:
                responses.append(FileUploadResponse(path=path, error=_file_error(e)))
        return responses

    def _is_dir(self, path: str) -> bool:
        try:
            self.sandbox.files.list(path)
            return True
        except (SandboxError, OSError):
            return False

    def download_files(self, paths: list[str]) -> list[FileDownloadResponse]:
        """Reads each absolute path; per-file errors."""
        responses = []
        for path in paths:
            try:
                responses.append(FileDownloadResponse(path=path,
                                                      content=self.sandbox.files.read(path)))
            except (SandboxError, OSError, TypeError) as e:
                error = _file_error(e)
                if error not in (FILE_NOT_FOUND, INVALID_PATH) and self._is_dir(path):
                    # The KVM guest reports reading a directory as EINVAL, not EISDIR.
                    error = IS_DIRECTORY
                responses.append(FileDownloadResponse(path=path, error=error))
        return responses
