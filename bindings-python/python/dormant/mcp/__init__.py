"""``dormant-mcp``: dormant's sandboxes as tools of an MCP server, for any agent that speaks
the Model Context Protocol (needs the ``mcp`` extra: ``pip install "dormant[mcp]"``).

Run it as ``dormant-mcp`` or ``python -m dormant.mcp``. By default it speaks MCP over stdio
(what a client that starts it as a subprocess uses). ``--transport http`` serves streamable
HTTP at ``http://127.0.0.1:PORT/mcp`` instead: on the loopback only, and only to requests that
carry ``Authorization: Bearer <token>``, the token being ``$DORMANT_MCP_TOKEN`` or, when that is
unset, a random one the server prints on stderr; other requests get 401.

Tools (arguments as named; every result is a JSON object, also given as text):

- ``create_sandbox(tier="wasi", image=None, template=None, memory_mib=None, network=None)``
  → ``{"sandbox_id", "tier"}``
- ``list_sandboxes()`` → ``{"sandboxes": [{"sandbox_id", "tier", "state", "snapshot_id"}]}``
- ``run_code(sandbox_id, code, timeout=None)`` → ``{"stdout", "stderr", "error",
  "results"}``, each matplotlib figure also as a PNG image content block
- ``run_command(sandbox_id, command, background=False, timeout=None)`` → ``{"stdout",
  "stderr", "exit_code"}``, or ``{"pid"}`` in the background
- ``process_output(sandbox_id, pid)`` → ``{"stdout", "stderr", "running", "exit_code"}``
  (output since the previous call); ``kill_process(sandbox_id, pid)``
- ``read_file(sandbox_id, path)`` → ``{"content", "encoding"}`` (``"utf-8"``, or
  ``"base64"`` for binary files), ``write_file(sandbox_id, path, content)``,
  ``list_files(sandbox_id, path)``
- ``expose_port(sandbox_id, port)`` → ``{"address": "127.0.0.1:N"}`` (KVM tier)
- ``checkpoint(sandbox_id)``, ``standby(sandbox_id)`` → ``{"snapshot_id"}``
- ``fork(sandbox_id, n=1)`` → ``{"sandbox_ids"}``; ``kill_sandbox(sandbox_id)``

Sandboxes are named by id and live in the store (``--store``, else
:func:`dormant.default_store`: ``$DORMANT_HOME`` or ``~/.local/share/dormant``): a sandbox this
server has not loaded (created by an earlier run of it, or by any program using the store) is
resumed from its latest snapshot on its first call (:meth:`dormant.Sandbox.connect`), and a
sandbox in standby wakes on its next call. When the server stops (end of stdin, SIGTERM,
SIGINT) it puts its running sandboxes in standby, so the next server finds them where they
were. ``kill_sandbox`` ends a sandbox for good: it leaves ``list_sandboxes`` and its id no
longer resolves (its snapshots stay in the store; :func:`dormant.list_snapshots`).

Errors come back as MCP tool errors (``isError``) whose text starts with the exception's class
(``SandboxNotFound: ...``, ``SandboxTimeout: ...``) followed by its message and hint; an
exception raised by the code of ``run_code`` is a result (``error``), not a tool error.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import secrets
import signal
import socket
import sys
from types import FrameType
from typing import Any

try:
    import mcp as _mcp  # noqa: F401
except ImportError as e:  # pragma: no cover - depends on the install
    raise ImportError(
        'dormant.mcp needs the MCP SDK: pip install "dormant[mcp]" (or "mcp>=2.3,<3")'
    ) from e

from ._server import Sandboxes, bearer_app, build_server

TOKEN_ENV = "DORMANT_MCP_TOKEN"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dormant-mcp",
        description="dormant's persistent sandboxes as MCP tools (stdio by default).",
    )
    p.add_argument(
        "--transport", choices=["stdio", "http"], default="stdio",
        help="stdio (default) or streamable HTTP on 127.0.0.1 with a bearer token",
    )
    p.add_argument("--host", default="127.0.0.1", help="HTTP: the address, 127.0.0.1 only")
    p.add_argument("--port", type=int, default=8765, help="HTTP: the port (0: a free one)")
    p.add_argument(
        "--store", default=None,
        help="the snapshot store (default: $DORMANT_HOME, else ~/.local/share/dormant)",
    )
    p.add_argument(
        "--idle-standby", type=float, default=15.0, metavar="SECONDS",
        help="a sandbox idle this long goes to standby by itself (default 15; 0: never)",
    )
    return p


def _check_loopback(host: str) -> None:
    try:
        ok = ipaddress.ip_address(host) == ipaddress.ip_address("127.0.0.1")
    except ValueError:
        ok = False
    if not ok:
        raise SystemExit(
            f"dormant-mcp: refusing to serve HTTP on {host!r}: the HTTP transport listens on "
            "127.0.0.1 only (reach it from elsewhere through an SSH tunnel)"
        )


def _serve_http(server: Any, host: str, port: int) -> None:
    import anyio
    import uvicorn

    token = os.environ.get(TOKEN_ENV) or ""
    if not token:
        token = secrets.token_urlsafe(32)
        print(f"dormant-mcp: bearer token (set {TOKEN_ENV} to choose one): {token}",
              file=sys.stderr, flush=True)
    app = bearer_app(server.streamable_http_app(host=host), token)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)
    bound = sock.getsockname()[1]
    print(f"dormant-mcp: serving MCP at http://{host}:{bound}/mcp", file=sys.stderr, flush=True)
    config = uvicorn.Config(app, log_level="warning", lifespan="on")
    anyio.run(lambda: uvicorn.Server(config).serve(sockets=[sock]))


class _Stopped(BaseException):
    """Raised by SIGTERM's handler: the server stops as at the end of its input."""


def _stop(signum: int, frame: FrameType | None) -> None:
    raise _Stopped


def main(argv: list[str] | None = None) -> int:
    """Runs the server until its client goes (stdio: end of input) or a signal stops it,
    then puts its running sandboxes in standby. Returns the exit status."""
    args = _parser().parse_args(argv)
    if args.transport == "http":
        _check_loopback(args.host)
    store = args.store or None
    idle = args.idle_standby if args.idle_standby > 0 else None
    server, boxes_ref = build_server(store, idle_standby=idle)
    # SIGTERM ends the server as the end of its input does (uvicorn handles it while it serves,
    # then raises it again once it has stopped).
    signal.signal(signal.SIGTERM, _stop)
    try:
        if args.transport == "http":
            _serve_http(server, args.host, args.port)
        else:
            server.run("stdio")
    except (KeyboardInterrupt, _Stopped):
        pass
    finally:
        # A second SIGTERM (an MCP client escalates after a grace period) must not cut the
        # standby short.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        boxes_ref.standby_all()
    return 0


__all__ = ["Sandboxes", "build_server", "main"]
