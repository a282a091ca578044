"""What a sandbox has used (:class:`Metrics`) and what the store holds (:class:`StoreUsage`)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Union

from . import _native

StrPath = Union[str, "os.PathLike[str]"]


@dataclass(frozen=True)
class Metrics:
    """What a sandbox has used, as :meth:`Sandbox.metrics` reports it.

    The first four figures belong to this handle in this process: they start at zero when the
    sandbox is created or resumed (a snapshot does not carry them) and add up across its
    standby/resume cycles. The snapshot figures are the store's, for every snapshot of this
    sandbox id.
    """

    cpu_time_s: float
    """CPU time the guest ran on host threads, in seconds (user + system): the WASI tier's
    calls into the guest, the KVM tier's vCPU thread."""
    memory_bytes: int
    """Guest memory in use now, in bytes: the WASI tier's linear memory size, the KVM tier's
    guest RAM pages touched since boot or resume. 0 in standby."""
    memory_limit_bytes: int
    """The most guest memory the sandbox may use, in bytes (its ``memory_mib``)."""
    disk_bytes_written: int
    """Bytes the guest wrote to its filesystem: file writes on the WASI tier (the guest's and
    ``files.write``), bytes written through the block device on the KVM tier (the guest
    filesystem's metadata and journal included)."""
    snapshot_bytes_stored: int
    """Bytes on disk that only this sandbox's snapshots need (0 before its first
    checkpoint)."""
    snapshot_bytes_shared: int
    """Bytes on disk its snapshots need that are stored once for it and other sandboxes: the
    template or fork parent it was made from, and chunks other snapshots use too."""
    snapshots: int
    """Snapshots of this sandbox in the store."""


@dataclass(frozen=True)
class StoreUsage:
    """A summary of a snapshot store, as :func:`store_usage` reports it."""

    snapshots: int
    """Committed snapshots."""
    sandboxes: int
    """Distinct sandbox ids among them."""
    bytes_on_disk: int
    """Bytes the snapshots take on disk: their files (allocated blocks, a hard-linked file
    once), the compact snapshots' chunks and the cache of rebuilt compact files."""
    logical_bytes: int
    """Bytes the snapshots describe (each one's memory size plus its filesystem archive), as
    if nothing were shared, sparse or compressed."""
    chunks: int
    """Stored chunks of compact snapshots."""
    chunk_bytes: int
    """Compressed bytes of those chunks."""


def _metrics(native: _native.NativeSandbox, store_root: str) -> Metrics:
    cpu, memory, limit, written = native.metrics()
    snapshots, stored, shared = _native.sandbox_usage(native.id, store_root)
    return Metrics(
        cpu_time_s=cpu,
        memory_bytes=memory,
        memory_limit_bytes=limit,
        disk_bytes_written=written,
        snapshot_bytes_stored=stored,
        snapshot_bytes_shared=shared,
        snapshots=snapshots,
    )


def store_usage(store: StrPath | None = None) -> StoreUsage:
    """A summary of the snapshot store ``store`` (default: :func:`default_store`): snapshots,
    sandboxes, bytes on disk, logical bytes and chunks. Reads every snapshot's manifest, so
    it takes longer the more snapshots the store holds."""
    from ._sandbox import _store

    snapshots, sandboxes, on_disk, logical, chunks, chunk_bytes = _native.store_usage(
        _store(store)
    )
    return StoreUsage(
        snapshots=snapshots,
        sandboxes=sandboxes,
        bytes_on_disk=on_disk,
        logical_bytes=logical,
        chunks=chunks,
        chunk_bytes=chunk_bytes,
    )
