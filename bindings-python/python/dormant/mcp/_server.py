"""The MCP server: dormant's sandboxes as MCP tools (see :mod:`dormant.mcp`)."""

from __future__ import annotations

import base64
import contextlib
import hmac
import json
import logging
import threading
from collections.abc import Iterator
from typing import Annotated, Any, Literal, Union

from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.types import CallToolResult, ContentBlock, ImageContent, TextContent
from typing_extensions import TypedDict

import dormant

from .. import _native
from .._sandbox import NetworkArg
from .._errors import SandboxError

log = logging.getLogger("dormant.mcp")

INSTRUCTIONS = """\
Persistent sandboxes: Python sessions (tier "wasi") and Linux microVMs (tier "kvm") whose
memory, files and processes survive between calls and across restarts of this server. Create
one with create_sandbox and pass its sandbox_id to every other tool. Variables and imports set
by run_code stay for the next run_code. A sandbox idle for a while sleeps to disk (standby) and
wakes on its next call; standby does it now. Charts drawn by run_code come back as PNG images.
"""

# File contents returned as text up to this size; larger files are refused (read them in parts
# with run_command, or run_code).
MAX_READ_BYTES = 8 << 20


class ErrorInfo(TypedDict):
    """An exception raised by the code of run_code."""

    name: str
    value: str
    traceback: str


class ResultInfo(TypedDict):
    """One rich result of run_code (a figure, the final expression's value); PNG images come as
    image content blocks, in the order of the results that have one."""

    text: str | None
    html: str | None
    markdown: str | None
    svg: str | None
    json: Any
    png: bool
    is_main_result: bool


class RunCodeOutput(TypedDict):
    stdout: str
    stderr: str
    error: ErrorInfo | None
    results: list[ResultInfo]


class SandboxCreated(TypedDict):
    sandbox_id: str
    tier: str


class SandboxEntry(TypedDict):
    sandbox_id: str
    tier: str
    state: str
    snapshot_id: str | None


class SandboxList(TypedDict):
    sandboxes: list[SandboxEntry]


class CommandOutput(TypedDict):
    stdout: str | None
    stderr: str | None
    exit_code: int | None
    pid: int | None


class ProcessOutput(TypedDict):
    stdout: str
    stderr: str
    running: bool
    exit_code: int | None


class FileContent(TypedDict):
    path: str
    content: str
    encoding: Literal["utf-8", "base64"]
    size: int


class FileWritten(TypedDict):
    path: str
    size: int


class FileEntry(TypedDict):
    name: str
    is_dir: bool
    size: int


class FileList(TypedDict):
    path: str
    entries: list[FileEntry]


class PortExposed(TypedDict):
    port: int
    address: str


class Snapshot(TypedDict):
    sandbox_id: str
    snapshot_id: str


class Forked(TypedDict):
    sandbox_ids: list[str]


class Done(TypedDict):
    sandbox_id: str
    ok: bool


def _describe(exc: BaseException) -> str:
    """``ClassName: message`` of an exception, as a tool error shows it."""
    return f"{type(exc).__name__}: {exc}"


@contextlib.contextmanager
def _tool_errors() -> Iterator[None]:
    """Turns what a tool raises into an MCP tool error naming the exception's class (dormant's
    messages end with a hint saying what to do). Nothing a sandbox does crashes the server."""
    try:
        yield
    except ToolError:
        raise
    except (SandboxError, TypeError, ValueError, OSError) as e:
        raise ToolError(_describe(e)) from e
    except Exception as e:
        log.exception("a tool failed unexpectedly")
        raise ToolError(_describe(e)) from e


def _text(data: bytes) -> str:
    return data.decode("utf-8", errors="replace")


class Sandboxes:
    """The sandboxes this server holds, by id, over a store: a sandbox not loaded here (created
    by an earlier server, or by any process using the store) is resumed from its latest snapshot
    on first use (:meth:`dormant.Sandbox.connect`). Thread-safe: tools run in worker threads."""

    def __init__(self, store: str, idle_standby: float | None) -> None:
        self.store = store
        self.idle_standby = idle_standby
        self._lock = threading.Lock()
        self._live: dict[str, dormant.Sandbox] = {}
        self._connecting: dict[str, threading.Lock] = {}

    def add(self, sb: dormant.Sandbox) -> dormant.Sandbox:
        with self._lock:
            self._live[sb.id] = sb
        return sb

    def loaded(self) -> list[dormant.Sandbox]:
        with self._lock:
            return list(self._live.values())

    def get(self, sandbox_id: str) -> dormant.Sandbox:
        """The sandbox ``sandbox_id``, loaded from the store if needed. A poisoned handle (its
        last call failed, e.g. a timeout in a WASI session) is replaced by a resume of the
        sandbox's latest snapshot. Raises :class:`dormant.SandboxNotFound`."""
        if not isinstance(sandbox_id, str):
            raise TypeError(f"sandbox_id must be a str, not {type(sandbox_id).__name__}")
        with self._lock:
            sb = self._live.get(sandbox_id)
            if sb is not None and sb.state in ("running", "standby"):
                return sb
            gate = self._connecting.setdefault(sandbox_id, threading.Lock())
        with gate:
            with self._lock:
                sb = self._live.get(sandbox_id)
                if sb is not None and sb.state in ("running", "standby"):
                    return sb
            sb = dormant.Sandbox.connect(
                sandbox_id, store=self.store, idle_standby=self.idle_standby
            )
            return self.add(sb)

    def kill(self, sandbox_id: str) -> None:
        """Kills ``sandbox_id`` (loaded or not) and retires it from the store's listing."""
        with self._lock:
            sb = self._live.pop(sandbox_id, None)
        if sb is not None and sb.state != "killed":
            sb.kill()
            return
        # Not loaded here: retire it in the store without waking it.
        _native.latest_snapshot(sandbox_id, self.store)  # SandboxNotFound when unknown
        _native.retire_sandbox(sandbox_id, self.store)

    def list(self) -> list[SandboxEntry]:
        entries: dict[str, SandboxEntry] = {}
        for info in dormant.list_sandboxes(self.store):
            entries[info.id] = SandboxEntry(
                sandbox_id=info.id, tier=info.tier, state="standby", snapshot_id=info.snapshot_id
            )
        for sb in self.loaded():
            state = sb.state
            stored = entries.pop(sb.id, None)
            if state == "killed":
                continue
            entries[sb.id] = SandboxEntry(
                sandbox_id=sb.id,
                tier=sb.tier,
                state=state,
                snapshot_id=sb.snapshot_id or (stored["snapshot_id"] if stored else None),
            )
        return sorted(entries.values(), key=lambda e: e["sandbox_id"])

    def standby_all(self) -> None:
        """Puts every running sandbox loaded here in standby (on shutdown): their state is then
        in the store, for the next server."""
        for sb in self.loaded():
            if sb.state == "running":
                try:
                    sb.standby()
                except Exception:
                    log.exception("standby of %s on shutdown failed", sb.id)


def _network(network: str | list[str] | None) -> NetworkArg:
    if network is None:
        return None
    if network == "open":
        return "open"
    if isinstance(network, str):
        raise dormant.InvalidArgument(
            f"network={network!r}: use null (no network), \"open\", or a list of allowed "
            "destinations ([\"pypi.org\", \"*.github.com\", \"10.0.0.0/8\", \"host\"])"
        )
    return dormant.NetworkPolicy(allow=network)


def _run_code_result(execution: dormant.Execution) -> CallToolResult:
    error = execution.error
    results: list[ResultInfo] = []
    images: list[ContentBlock] = []
    for r in getattr(execution, "results", None) or []:
        png = getattr(r, "png", None)
        results.append(
            ResultInfo(
                text=getattr(r, "text", None),
                html=getattr(r, "html", None),
                markdown=getattr(r, "markdown", None),
                svg=getattr(r, "svg", None),
                json=getattr(r, "json", None),
                png=png is not None,
                is_main_result=bool(getattr(r, "is_main_result", False)),
            )
        )
        if png is not None:
            images.append(
                ImageContent(
                    type="image", data=base64.b64encode(png).decode("ascii"), mime_type="image/png"
                )
            )
    out = RunCodeOutput(
        stdout=execution.stdout,
        stderr=execution.stderr,
        error=None
        if error is None
        else ErrorInfo(name=error.name, value=error.value, traceback=error.traceback),
        results=results,
    )
    text = TextContent(type="text", text=json.dumps(out))
    return CallToolResult(content=[text, *images], structured_content=dict(out))


def build_server(store: str | None = None, *, idle_standby: float | None = 15.0) -> tuple[
    MCPServer[Any], Sandboxes
]:
    """The MCP server over ``store`` (default :func:`dormant.default_store`), and the sandboxes
    it holds (for the caller to put in standby on shutdown: :meth:`Sandboxes.standby_all`)."""
    boxes = Sandboxes(store or dormant.default_store(), idle_standby)
    server: MCPServer[Any] = MCPServer(
        "dormant", instructions=INSTRUCTIONS, version=dormant.__version__, log_level="WARNING"
    )

    @server.tool()
    def create_sandbox(
        tier: Literal["wasi", "kvm"] = "wasi",
        image: str | None = None,
        template: str | None = None,
        memory_mib: int | None = None,
        network: Union[str, list[str], None] = None,
    ) -> SandboxCreated:
        """Creates a sandbox and returns its id. tier "wasi": a Python session (numpy, pandas,
        matplotlib); tier "kvm": a Linux microVM (shell, processes, servers) whose image is
        "base" (Debian, the default), "coding" (Python and build tools) or "minimal" (an image
        implies tier "kvm"). template: a built dormant template's name (the sandbox gets its
        tier). memory_mib: memory cap in MiB. network (kvm only): null for none, "open", or a
        list of allowed destinations (domains, "*.domain", IPs, CIDRs, "host" for this
        machine's 127.0.0.1)."""
        with _tool_errors():
            sb = dormant.Sandbox.create(
                # "wasi" is the default: left out, a template's tier or an image's (kvm) applies.
                None if tier == "wasi" else tier,
                template=template,
                image=image,
                store=boxes.store,
                memory_mib=memory_mib,
                idle_standby=boxes.idle_standby,
                network=_network(network),
            )
            boxes.add(sb)
            return SandboxCreated(sandbox_id=sb.id, tier=sb.tier)

    @server.tool()
    def list_sandboxes() -> SandboxList:
        """The sandboxes: those of the store (asleep, state "standby") and those loaded in this
        server (state "running", "standby" or "poisoned"), each with its latest snapshot."""
        with _tool_errors():
            return SandboxList(sandboxes=boxes.list())

    @server.tool(structured_output=True)
    def run_code(
        sandbox_id: str, code: str, timeout: float | None = None
    ) -> Annotated[CallToolResult, RunCodeOutput]:
        """Runs Python code in the sandbox's session; variables and imports persist between
        calls. Returns stdout, stderr, the exception raised (error: name, value, traceback; null
        when none) and rich results (figures, the final expression's value); every matplotlib
        figure comes back as a PNG image. timeout in seconds."""
        with _tool_errors():
            return _run_code_result(boxes.get(sandbox_id).run_code(code, timeout=timeout))

    @server.tool()
    def run_command(
        sandbox_id: str, command: str, background: bool = False, timeout: float | None = None
    ) -> CommandOutput:
        """Runs a shell command (kvm tier; on the wasi tier a .wasm command of the sandbox).
        Returns stdout, stderr and exit_code, or with background=true the pid at once (read its
        output with process_output, stop it with kill_process). timeout in seconds."""
        with _tool_errors():
            sb = boxes.get(sandbox_id)
            if background:
                handle = sb.commands.run(command, background=True, timeout=timeout)
                return CommandOutput(stdout=None, stderr=None, exit_code=None, pid=handle.pid)
            r = sb.commands.run(command, timeout=timeout)
            return CommandOutput(stdout=r.stdout, stderr=r.stderr, exit_code=r.exit_code, pid=None)

    @server.tool()
    def process_output(sandbox_id: str, pid: int) -> ProcessOutput:
        """The output of background process pid since the last process_output call, whether it
        still runs, and its exit code once it ended."""
        with _tool_errors():
            native = boxes.get(sandbox_id)._native
            out, err, running = native.output(pid)
            code = None if running else native.wait(pid, 0.0)
            return ProcessOutput(stdout=_text(out), stderr=_text(err), running=running, exit_code=code)

    @server.tool()
    def kill_process(sandbox_id: str, pid: int) -> Done:
        """Stops background process pid (SIGKILL to its process group)."""
        with _tool_errors():
            boxes.get(sandbox_id)._native.signal(pid, 9)
            return Done(sandbox_id=sandbox_id, ok=True)

    @server.tool()
    def read_file(sandbox_id: str, path: str) -> FileContent:
        """A file of the sandbox (absolute path): its text (encoding "utf-8"), or base64 when it
        is not UTF-8 text. Up to 8 MiB."""
        with _tool_errors():
            data = boxes.get(sandbox_id).files.read(path)
            if len(data) > MAX_READ_BYTES:
                raise dormant.LimitExceeded(
                    f"{path} has {len(data)} bytes, more than read_file returns "
                    f"({MAX_READ_BYTES}); read it in parts with run_command or run_code"
                )
            try:
                return FileContent(
                    path=path, content=data.decode("utf-8"), encoding="utf-8", size=len(data)
                )
            except UnicodeDecodeError:
                return FileContent(
                    path=path,
                    content=base64.b64encode(data).decode("ascii"),
                    encoding="base64",
                    size=len(data),
                )

    @server.tool()
    def write_file(sandbox_id: str, path: str, content: str) -> FileWritten:
        """Writes a whole text file (absolute path; parent directories created), replacing it."""
        with _tool_errors():
            data = content.encode("utf-8")
            boxes.get(sandbox_id).files.write(path, data)
            return FileWritten(path=path, size=len(data))

    @server.tool()
    def list_files(sandbox_id: str, path: str = "/") -> FileList:
        """The entries of a directory of the sandbox (absolute path)."""
        with _tool_errors():
            entries = boxes.get(sandbox_id).files.list(path)
            return FileList(
                path=path,
                entries=[FileEntry(name=e.name, is_dir=e.is_dir, size=e.size) for e in entries],
            )

    @server.tool()
    def expose_port(sandbox_id: str, port: int) -> PortExposed:
        """Makes the TCP server on the sandbox's port reachable from this machine (kvm tier) and
        returns its address, "127.0.0.1:N"."""
        with _tool_errors():
            return PortExposed(port=port, address=boxes.get(sandbox_id).expose(port))

    @server.tool()
    def checkpoint(sandbox_id: str) -> Snapshot:
        """Writes a durable snapshot of the sandbox; it keeps running."""
        with _tool_errors():
            return Snapshot(sandbox_id=sandbox_id, snapshot_id=boxes.get(sandbox_id).checkpoint())

    @server.tool()
    def standby(sandbox_id: str) -> Snapshot:
        """Puts the sandbox to sleep on disk (a snapshot), freeing its memory; its next call
        wakes it where it was."""
        with _tool_errors():
            return Snapshot(sandbox_id=sandbox_id, snapshot_id=boxes.get(sandbox_id).standby())

    @server.tool()
    def fork(sandbox_id: str, n: int = 1) -> Forked:
        """n independent copies of the sandbox as it is now, each with an id of its own."""
        with _tool_errors():
            children = boxes.get(sandbox_id).fork(n)
            return Forked(sandbox_ids=[boxes.add(c).id for c in children])

    @server.tool()
    def kill_sandbox(sandbox_id: str) -> Done:
        """Ends the sandbox for good: it leaves list_sandboxes and its id no longer works."""
        with _tool_errors():
            boxes.kill(sandbox_id)
            return Done(sandbox_id=sandbox_id, ok=True)

    return server, boxes


def bearer_app(app: Any, token: str) -> Any:
    """An ASGI app that answers 401 to every HTTP request without ``Authorization: Bearer
    <token>``, and passes the others (and lifespan events) to ``app``."""
    expected = f"Bearer {token}".encode()

    async def guarded(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            given = dict(scope.get("headers") or []).get(b"authorization", b"")
            if not hmac.compare_digest(given, expected):
                body = b'{"error": "unauthorized: send Authorization: Bearer <token>"}'
                await send(
                    {
                        "type": "http.response.start",
                        "status": 401,
                        "headers": [
                            (b"content-type", b"application/json"),
                            (b"www-authenticate", b'Bearer realm="dormant-mcp"'),
                            (b"content-length", str(len(body)).encode()),
                        ],
                    }
                )
                await send({"type": "http.response.body", "body": body})
                return
        await app(scope, receive, send)

    return guarded


__all__ = ["Sandboxes", "bearer_app", "build_server"]
