"""The MCP server, dormant-mcp, driven by the real MCP SDK's clients: stdio (a server process
started and restarted by the test) and streamable HTTP (with and without its bearer token);
and the store's sandboxes by id underneath it (dormant.list_sandboxes, Sandbox.connect)."""

from __future__ import annotations

import base64
import json
import os
import pathlib
import struct
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import httpx2
import pytest
from mcp import ClientSession
from mcp.client.stdio import StdioServerParameters, stdio_client
from mcp.client.streamable_http import streamable_http_client
from mcp.types import CallToolResult, ImageContent

import dormant

TOOLS = {
    "create_sandbox", "list_sandboxes", "run_code", "run_command", "process_output",
    "kill_process", "read_file", "write_file", "list_files", "expose_port", "checkpoint",
    "standby", "fork", "kill_sandbox",
}


def server_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop(TOKEN_ENV, None)
    return env


TOKEN_ENV = "DORMANT_MCP_TOKEN"


@asynccontextmanager
async def stdio_session(store: pathlib.Path) -> AsyncIterator[ClientSession]:
    params = StdioServerParameters(
        command=sys.executable,
        args=["-m", "dormant.mcp", "--store", str(store)],
        env=server_env(),
    )
    async with stdio_client(params) as (read, write):
        async with ClientSession(read, write) as session:
            await session.initialize()
            yield session


async def call(session: ClientSession, tool: str, **args: Any) -> dict[str, Any]:
    """Calls a tool that must succeed; its structured result."""
    r = await session.call_tool(tool, args)
    assert isinstance(r, CallToolResult)
    assert not r.is_error, f"{tool} failed: {r.content}"
    assert r.structured_content is not None, f"{tool} gave no structured content"
    # The text content is the same JSON object, for clients that read only text.
    text = getattr(r.content[0], "text", None)
    assert text is not None and json.loads(text) == r.structured_content
    return dict(r.structured_content)


async def call_error(session: ClientSession, tool: str, **args: Any) -> str:
    """Calls a tool that must fail with a tool error; its text."""
    r = await session.call_tool(tool, args)
    assert isinstance(r, CallToolResult)
    assert r.is_error, f"{tool} should have failed: {r.structured_content}"
    text = " ".join(getattr(c, "text", "") for c in r.content)
    # The SDK puts this before a tool's error; dormant's part names the exception's class.
    return text.removeprefix(f"Error executing tool {tool}: ")


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


@pytest.mark.timeout(600)
def test_stdio_session_survives_a_server_restart(store: pathlib.Path) -> None:
    async def first() -> tuple[str, str]:
        async with stdio_session(store) as s:
            names = {t.name for t in (await s.list_tools()).tools}
            assert TOOLS <= names, f"missing tools: {TOOLS - names}"
            schemas = {t.name: t for t in (await s.list_tools()).tools}
            assert schemas["run_code"].output_schema is not None
            assert set(schemas["run_code"].input_schema["properties"]) == {
                "sandbox_id", "code", "timeout"
            }
            created = await call(s, "create_sandbox", tier="wasi")
            sid = created["sandbox_id"]
            assert created["tier"] == "wasi"
            out = await call(s, "run_code", sandbox_id=sid, code="answer = 6 * 7\nprint(answer)")
            assert (out["stdout"], out["error"]) == ("42\n", None)
            raised = await call(s, "run_code", sandbox_id=sid, code="1 / 0")
            assert raised["error"]["name"] == "ZeroDivisionError"
            await call(s, "write_file", sandbox_id=sid, path="/data/notes.txt", content="héllo")
            got = await call(s, "read_file", sandbox_id=sid, path="/data/notes.txt")
            assert (got["content"], got["encoding"], got["size"]) == ("héllo", "utf-8", 6)
            listing = await call(s, "list_files", sandbox_id=sid, path="/data")
            assert [e["name"] for e in listing["entries"]] == ["notes.txt"]
            listed = await call(s, "list_sandboxes")
            assert [(e["sandbox_id"], e["state"]) for e in listed["sandboxes"]] == [
                (sid, "running")
            ]
            snap = (await call(s, "standby", sandbox_id=sid))["snapshot_id"]
            listed = await call(s, "list_sandboxes")
            assert [(e["sandbox_id"], e["state"], e["snapshot_id"]) for e in
                    listed["sandboxes"]] == [(sid, "standby", snap)]
            return sid, snap

    sid, snap = anyio.run(first)
    # The server process ended with its client: a new one finds the sandbox in the store.

    async def second() -> None:
        async with stdio_session(store) as s:
            listed = await call(s, "list_sandboxes")
            assert [(e["sandbox_id"], e["snapshot_id"]) for e in listed["sandboxes"]] == [
                (sid, snap)
            ]
            out = await call(s, "run_code", sandbox_id=sid, code="print(answer)")
            assert out["stdout"] == "42\n", "the variable came back after the restart"
            got = await call(s, "read_file", sandbox_id=sid, path="/data/notes.txt")
            assert got["content"] == "héllo"
            # The server's end (here: end of its stdin) puts it in standby with what it has.
            await call(s, "run_code", sandbox_id=sid, code="answer += 1")

    anyio.run(second)
    infos = dormant.list_sandboxes(store)
    assert [i.id for i in infos] == [sid]
    assert infos[0].snapshot_id != snap, "the server put the sandbox in standby on exit"
    sb = dormant.Sandbox.connect(sid, store=store, idle_standby=None)
    assert sb.run_code("print(answer)").stdout == "43\n"
    sb.kill()
    assert dormant.list_sandboxes(store) == []
    with pytest.raises(dormant.SandboxNotFound, match="list_sandboxes"):
        dormant.Sandbox.connect(sid, store=store)


@pytest.mark.timeout(600)
def test_charts_come_back_as_png_images(store: pathlib.Path) -> None:
    if not hasattr(dormant, "Result"):
        pytest.skip("SKIPPED: needs Execution.results (dormant.Result, rich results of run_code)")

    async def go() -> None:
        async with stdio_session(store) as s:
            sid = (await call(s, "create_sandbox"))["sandbox_id"]
            code = (
                "import matplotlib.pyplot as plt\n"
                "fig = plt.figure(figsize=(4, 3), dpi=50)\n"
                "plt.plot([1, 2, 3], [3, 1, 2])\n"
                "plt.show()\n"
            )
            r = await s.call_tool("run_code", {"sandbox_id": sid, "code": code})
            assert not r.is_error, r.content
            images = [c for c in r.content if isinstance(c, ImageContent)]
            assert len(images) == 1, r.content
            assert images[0].mime_type == "image/png"
            assert png_size(base64.b64decode(images[0].data)) == (200, 150)
            assert r.structured_content is not None
            assert [x["png"] for x in r.structured_content["results"]] == [True]

    anyio.run(go)


@pytest.mark.timeout(600)
def test_errors_are_tool_errors_naming_the_exception(store: pathlib.Path) -> None:
    async def go() -> None:
        async with stdio_session(store) as s:
            text = await call_error(s, "run_code", sandbox_id="sb-0000000000000000", code="1")
            assert text.startswith("SandboxNotFound: ") and "list_sandboxes" in text, text
            text = await call_error(s, "create_sandbox", tier="wasi", network="open")
            assert text.startswith("Unsupported: "), text
            sid = (await call(s, "create_sandbox"))["sandbox_id"]
            text = await call_error(s, "read_file", sandbox_id=sid, path="/no/such/file")
            assert text.startswith("SandboxFileNotFoundError: "), text
            text = await call_error(s, "read_file", sandbox_id=sid, path="relative")
            assert text.startswith("InvalidArgument: "), text
            text = await call_error(s, "expose_port", sandbox_id=sid, port=8000)
            assert text.startswith("Unsupported: "), text
            # The server is still there, and the sandbox too.
            out = await call(s, "run_code", sandbox_id=sid, code="print('alive')")
            assert out["stdout"] == "alive\n"
            forked = (await call(s, "fork", sandbox_id=sid, n=2))["sandbox_ids"]
            assert len(set(forked)) == 2 and sid not in forked
            # Killed: gone from the listing, and its id no longer resolves.
            await call(s, "checkpoint", sandbox_id=sid)
            await call(s, "kill_sandbox", sandbox_id=sid)
            listed = [e["sandbox_id"] for e in (await call(s, "list_sandboxes"))["sandboxes"]]
            assert sid not in listed and set(forked) <= set(listed)
            text = await call_error(s, "run_code", sandbox_id=sid, code="1")
            assert text.startswith("SandboxNotFound: "), text

    anyio.run(go)
    assert all(i.id != "" for i in dormant.list_sandboxes(store))


class HttpServer:
    def __init__(self, store: pathlib.Path, token: str | None) -> None:
        env = server_env()
        if token is not None:
            env[TOKEN_ENV] = token
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dormant.mcp", "--transport", "http", "--port", "0",
             "--store", str(store)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            env=env, text=True,
        )
        self.url = ""
        self.token = token or ""
        assert self.proc.stderr is not None
        deadline = time.monotonic() + 120
        while not self.url and time.monotonic() < deadline:
            line = self.proc.stderr.readline()
            if not line:
                break
            if "bearer token" in line:
                self.token = line.rsplit(" ", 1)[1].strip()
            if "serving MCP at " in line:
                self.url = line.split("serving MCP at ", 1)[1].strip()
        assert self.url, f"the server did not start (exit {self.proc.poll()})"

    def stop(self) -> int:
        self.proc.terminate()
        return self.proc.wait(timeout=120)


@pytest.fixture
def http_server(store: pathlib.Path) -> Iterator[HttpServer]:
    srv = HttpServer(store, None)
    try:
        yield srv
    finally:
        if srv.proc.poll() is None:
            srv.stop()


@pytest.mark.timeout(600)
def test_http_needs_the_bearer_token(http_server: HttpServer, store: pathlib.Path) -> None:
    assert http_server.url.startswith("http://127.0.0.1:")
    assert len(http_server.token) >= 32, "a generated token is printed on stderr"
    init = {
        "jsonrpc": "2.0", "id": 1, "method": "initialize",
        "params": {"protocolVersion": "2025-06-18", "capabilities": {},
                   "clientInfo": {"name": "t", "version": "0"}},
    }
    headers = {"accept": "application/json, text/event-stream"}
    for auth in (None, "Bearer wrong", f"Basic {http_server.token}"):
        h = dict(headers, **({"authorization": auth} if auth else {}))
        r = httpx2.post(http_server.url, json=init, headers=h, timeout=60)
        assert r.status_code == 401, (auth, r.status_code, r.text)

    async def go() -> None:
        client = httpx2.AsyncClient(
            headers={"authorization": f"Bearer {http_server.token}"}, timeout=300
        )
        async with client, streamable_http_client(http_server.url, http_client=client) as (
            read, write
        ):
            async with ClientSession(read, write) as s:
                await s.initialize()
                names = {t.name for t in (await s.list_tools()).tools}
                assert TOOLS <= names
                sid = (await call(s, "create_sandbox"))["sandbox_id"]
                out = await call(s, "run_code", sandbox_id=sid, code="v = 'over http'")
                assert out["error"] is None

    anyio.run(go)
    assert http_server.stop() == 0, "SIGTERM stops the server cleanly"
    infos = dormant.list_sandboxes(store)
    assert len(infos) == 1, "SIGTERM put the live sandbox in standby"
    sb = dormant.Sandbox.connect(infos[0].id, store=store, idle_standby=None)
    assert sb.run_code("print(v)").stdout == "over http\n"


def test_http_only_on_loopback_and_the_token_from_the_environment(store: pathlib.Path) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "dormant.mcp", "--transport", "http", "--host", "0.0.0.0",
         "--store", str(store)],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120, env=server_env(),
    )
    assert r.returncode != 0 and "127.0.0.1 only" in r.stderr, r.stderr
    srv = HttpServer(store, "a-token-of-my-choosing-0123456789")
    try:
        assert srv.token == "a-token-of-my-choosing-0123456789"
        h = {"accept": "application/json, text/event-stream", "authorization": "Bearer nope"}
        assert httpx2.post(srv.url, json={}, headers=h, timeout=60).status_code == 401
        h["authorization"] = f"Bearer {srv.token}"
        assert httpx2.post(srv.url, json={}, headers=h, timeout=60).status_code != 401
    finally:
        srv.stop()


def test_list_sandboxes_and_connect_by_id(store: pathlib.Path) -> None:
    a = dormant.Sandbox.create("wasi", store=store, idle_standby=None)
    assert dormant.list_sandboxes(store) == [], "nothing in the store before a snapshot"
    a.run_code("x = 1")
    first = a.checkpoint()
    a.run_code("x = 2")
    latest = a.standby()
    b = dormant.Sandbox.create("wasi", store=store, idle_standby=None)
    b.checkpoint()
    infos = {i.id: i for i in dormant.list_sandboxes(store)}
    assert set(infos) == {a.id, b.id}
    assert (infos[a.id].snapshot_id, infos[a.id].snapshots, infos[a.id].tier) == (
        latest, 2, "wasi"
    )
    assert infos[a.id].updated.tzinfo is not None and first != latest
    c = dormant.Sandbox.connect(a.id, store=store, idle_standby=None)
    assert c.id == a.id and c.snapshot_id == latest
    assert c.run_code("print(x)").stdout == "2\n"
    c.kill()
    assert [i.id for i in dormant.list_sandboxes(store)] == [b.id]
    with pytest.raises(dormant.SandboxNotFound):
        dormant.Sandbox.connect(a.id, store=store)
    # Its snapshots stay, resumable by snapshot id.
    assert dormant.Sandbox.resume(first, store=store).run_code("print(x)").stdout == "1\n"
    with pytest.raises(dormant.SandboxNotFound):
        dormant.Sandbox.connect("../etc", store=store)


@pytest.mark.timeout(1200)
def test_kvm_processes_and_ports_through_mcp(kvm_store: pathlib.Path) -> None:
    """run_command in the background, process_output, kill_process and expose_port on one small
    Linux guest (busybox), in the KVM tests' shared store."""
    import urllib.request

    async def until(what: str, check: Any) -> Any:
        deadline = time.monotonic() + 300
        while True:
            got = await check()
            if got:
                return got
            assert time.monotonic() < deadline, f"{what}: not within 300 s"
            await anyio.sleep(0.2)

    async def go() -> None:
        async with stdio_session(kvm_store) as s:
            sid = (await call(s, "create_sandbox", tier="kvm", image="minimal",
                              memory_mib=128))["sandbox_id"]
            ran = await call(s, "run_command", sandbox_id=sid, command="echo $((6 * 7)); exit 3")
            assert (ran["stdout"], ran["exit_code"], ran["pid"]) == ("42\n", 3, None)
            job = await call(s, "run_command", sandbox_id=sid,
                             command="echo started; sleep 600", background=True)
            pid = job["pid"]
            assert isinstance(pid, int) and job["exit_code"] is None
            seen: list[str] = []

            async def started() -> bool:
                o = await call(s, "process_output", sandbox_id=sid, pid=pid)
                seen.append(o["stdout"])
                return "started\n" in "".join(seen) and bool(o["running"])

            await until("the background command's output", started)
            await call(s, "kill_process", sandbox_id=sid, pid=pid)

            async def ended() -> dict[str, Any] | None:
                o = await call(s, "process_output", sandbox_id=sid, pid=pid)
                return None if o["running"] else o

            assert (await until("the killed command's end", ended))["exit_code"] == 128 + 9

            await call(s, "write_file", sandbox_id=sid, path="/var/www/index.html",
                       content="hello over mcp\n")
            await call(s, "run_command", sandbox_id=sid, background=True,
                       command="httpd -f -p 127.0.0.1:8080 -h /var/www")

            async def serving() -> bool:
                r = await call(s, "run_command", sandbox_id=sid,
                               command="wget -qO- http://127.0.0.1:8080/index.html")
                return "hello" in str(r["stdout"])

            await until("httpd in the guest", serving)
            addr = (await call(s, "expose_port", sandbox_id=sid, port=8080))["address"]
            assert addr.startswith("127.0.0.1:")
            with urllib.request.urlopen(f"http://{addr}/index.html", timeout=120) as page:
                assert page.read() == b"hello over mcp\n"
            await call(s, "kill_sandbox", sandbox_id=sid)

    anyio.run(go)
