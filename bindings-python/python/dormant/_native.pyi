"""Type stubs of dormant's native module (the Rust half; use the ``dormant`` package)."""

import builtins
from collections.abc import Callable
from typing import final

__all__ = [
    "NativeSandbox",
    "list_snapshots",
    "delete_snapshot",
    "kvm_status",
    "build_template",
    "list_templates",
    "build_image",
    "list_images",
    "parse_network_policy",
    "__version__",
]

__version__: str

@final
class NativeSandbox:
    @staticmethod
    def create(
        tier: str,
        store_root: str,
        memory_mib: int | None,
        timeout: float | None,
        idle_standby: float | None,
        env: list[tuple[str, str]],
        volumes: list[tuple[str, str, bool]],
        output_limit: int | None = None,
        image: str | None = None,
        network: tuple[list[str], list[str]] | None = None,
    ) -> NativeSandbox: ...
    @staticmethod
    def from_template(
        name: str,
        store_root: str,
        idle_standby: float | None,
        volumes: list[tuple[str, str, bool]],
        tier: str | None = None,
    ) -> NativeSandbox: ...
    @staticmethod
    def resume(
        snapshot_id: str,
        store_root: str,
        idle_standby: float | None,
        volumes: list[tuple[str, str, bool]],
        detach_missing: bool,
    ) -> NativeSandbox: ...
    @property
    def id(self) -> str: ...
    @property
    def tier(self) -> str: ...
    @property
    def state(self) -> str: ...
    def run_code(
        self, code: str, timeout: float | None = None
    ) -> tuple[
        str,
        str,
        tuple[str, str, str] | None,
        list[
            tuple[
                str | None, str | None, str | None, bytes | None, str | None, str | None, bool
            ]
        ],
    ]: ...
    def exec(
        self,
        argv: list[str],
        env: list[tuple[str, str]],
        cwd: str | None,
        timeout: float | None,
        on_stdout: Callable[[bytes], object] | None,
        on_stderr: Callable[[bytes], object] | None,
        shell: bool = False,
    ) -> tuple[bytes, bytes, int]: ...
    def spawn(
        self, argv: list[str], env: list[tuple[str, str]], cwd: str | None, shell: bool = False
    ) -> int: ...
    def wait(self, pid: int, timeout: float | None) -> int | None: ...
    def output(self, pid: int) -> tuple[bytes, bytes, bool]: ...
    def signal(self, pid: int, signal: int) -> None: ...
    def read(self, path: str) -> bytes: ...
    def write(self, path: str, data: bytes) -> None: ...
    def list(self, path: str) -> builtins.list[tuple[str, bool, int]]: ...
    def remove(self, path: str) -> None: ...
    def exists(self, path: str) -> bool: ...
    def checkpoint(self) -> str: ...
    def standby(self) -> str: ...
    def restore(self, snapshot_id: str) -> None: ...
    def set_network(self, allow: builtins.list[str], deny: builtins.list[str]) -> None: ...
    def network(self) -> tuple[builtins.list[str], builtins.list[str]]: ...
    def fork(self, n: int) -> builtins.list[NativeSandbox]: ...
    def kill(self) -> None: ...
    def expose(self, port: int, host_port: int) -> str: ...
    def unexpose(self, port: int) -> None: ...
    def exposed(self) -> builtins.list[tuple[int, int]]: ...

def list_snapshots(store_root: str) -> list[tuple[str, str, int, int]]: ...
def delete_snapshot(snapshot_id: str, store_root: str) -> None: ...
def kvm_status() -> tuple[bool, str]: ...
def build_template(
    name: str,
    tier: str,
    store_root: str,
    image: str | None,
    memory_mib: int | None,
    env: list[tuple[str, str]],
    volumes: list[tuple[str, str, bool]],
    files: list[tuple[str, bytes]],
    run: list[str],
    start: str | None,
    ready_port: int | None,
    ready_cmd: str | None,
    network: tuple[list[str], list[str]] | None = None,
) -> tuple[str, bool]: ...
def list_templates(store_root: str) -> list[tuple[str, str, str, int]]: ...
def build_image(
    name: str, packages: list[str] | None = None, rootfs: str | None = None
) -> tuple[str, str, str]: ...
def list_images() -> list[tuple[str, str, str]]: ...
def parse_network_policy(allow: list[str], deny: list[str]) -> tuple[list[str], list[str]]: ...
