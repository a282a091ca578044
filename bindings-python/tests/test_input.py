"""Bad input raises the documented exception; it never crashes the interpreter."""

from __future__ import annotations

import pathlib

import pytest

import dormant
from dormant import _native


@pytest.fixture
def sb(store: pathlib.Path) -> dormant.Sandbox:
    return dormant.Sandbox.create(store=store, idle_standby=None)


def test_wrong_types_are_type_errors(store: pathlib.Path, sb: dormant.Sandbox) -> None:
    with pytest.raises(TypeError):
        dormant.Sandbox.create(1, store=store)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        dormant.Sandbox.create(store=store, memory_mib="big")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        dormant.Sandbox.create(store=store, timeout="1")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        dormant.Sandbox.create(store=store, env={"A": 1})  # type: ignore[dict-item]
    with pytest.raises(TypeError):
        dormant.Sandbox.create(store=42)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        sb.run_code(b"print(1)")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        sb.files.write("/a", 5)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        sb.files.read(pathlib.Path("/a"))  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        sb.commands.run(5)  # type: ignore[call-overload]
    with pytest.raises(TypeError):
        sb.commands.run(["ok", 5])  # type: ignore[list-item]
    with pytest.raises(TypeError):
        sb.fork("2")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        dormant.Sandbox.resume(123, store=store)  # type: ignore[arg-type]
    # The native layer checks its own arguments too.
    with pytest.raises(TypeError):
        _native.NativeSandbox.create("wasi", 5, None, None, None, [], [])  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        sb._native.write("/a", "not bytes")  # type: ignore[arg-type]
    assert sb.run_code("print('fine')").stdout == "fine\n"


def test_bad_values_are_invalid_arguments(store: pathlib.Path, sb: dormant.Sandbox) -> None:
    with pytest.raises(dormant.InvalidArgument) as e:
        dormant.Sandbox.create("docker", store=store)  # type: ignore[arg-type]
    assert isinstance(e.value, ValueError) and "'wasi'" in str(e.value)
    for kw in (
        {"memory_mib": 0},
        {"timeout": -1},
        {"idle_standby": float("nan")},
        {"output_limit": 0},
    ):
        with pytest.raises(dormant.InvalidArgument):
            dormant.Sandbox.create(store=store, **kw)
    with pytest.raises(dormant.InvalidArgument):
        sb.fork(0)
    with pytest.raises(dormant.InvalidArgument):
        sb.commands.run([])
    with pytest.raises(dormant.InvalidArgument):
        sb.files.read("relative/path")
    with pytest.raises(dormant.InvalidArgument):
        dormant.Sandbox.create(store=store, volumes={"/v": str(store / "no-such-dir")})


def test_missing_snapshots(store: pathlib.Path) -> None:
    missing = "s-0000000000000001-00000000000000000000000000000000"
    for sid in (missing, "not-a-snapshot", ""):
        with pytest.raises(dormant.SnapshotNotFound) as e:
            dormant.Sandbox.resume(sid, store=store)
        assert "list_snapshots" in str(e.value) or "not a snapshot id" in str(e.value)


def test_path_escapes(sb: dormant.Sandbox) -> None:
    for p in ("/..", "/../etc/passwd", "/a/../../b"):
        with pytest.raises(dormant.PathEscape):
            sb.files.read(p)
        with pytest.raises(dormant.PathEscape):
            sb.files.write(p, "x")
    assert sb.state == "running"


def test_exceptions_form_one_hierarchy() -> None:
    for cls in (
        dormant.SnapshotNotFound,
        dormant.SnapshotCorrupt,
        dormant.LimitExceeded,
        dormant.SandboxTimeout,
        dormant.InvalidState,
        dormant.KvmUnavailable,
        dormant.Unsupported,
        dormant.InvalidArgument,
        dormant.PathEscape,
        dormant.ReadOnly,
        dormant.SandboxFileNotFoundError,
    ):
        assert issubclass(cls, dormant.SandboxError)
    assert issubclass(dormant.SandboxFileNotFoundError, FileNotFoundError)
    assert issubclass(dormant.SandboxTimeout, TimeoutError)
    assert issubclass(dormant.SandboxIOError, OSError)
