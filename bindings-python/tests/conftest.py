"""Shared fixtures. KVM tests skip, with the reason shown, only where this host has no usable
/dev/kvm; the README's test command runs them everywhere else."""

from __future__ import annotations

import pathlib
import signal
from collections.abc import Iterator

import pytest

import dormant

KVM_OK, KVM_WHY = dormant.kvm_available()
DATA = pathlib.Path(__file__).parent / "data"


def pytest_report_header(config: pytest.Config) -> str:
    return f"dormant {dormant.__version__}; KVM tier: {'yes' if KVM_OK else 'no'} ({KVM_WHY})"


@pytest.fixture
def store(tmp_path: pathlib.Path) -> pathlib.Path:
    return tmp_path / "store"


@pytest.fixture(scope="session")
def kvm_store(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """One store for every KVM test: the first create in it boots Linux once (its base
    snapshot); later creates resume that."""
    if not KVM_OK:
        pytest.skip(f"SKIPPED: the KVM tier cannot run here: {KVM_WHY}")
    return tmp_path_factory.mktemp("kvm-store")


@pytest.fixture
def hello_wasm() -> bytes:
    return (DATA / "hello.wasm").read_bytes()


@pytest.fixture
def sigint_raises() -> Iterator[None]:
    """SIGINT raises KeyboardInterrupt during the test, as in an interactive session, even where
    this process started with SIGINT ignored (a background job of a non-interactive shell,
    nohup: Python then never raises it). The previous disposition comes back afterwards."""
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)
