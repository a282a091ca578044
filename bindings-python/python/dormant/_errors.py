"""dormant's exceptions: one hierarchy rooted at :class:`SandboxError`.

I/O failures inside a sandbox also subclass the matching built-in :class:`OSError`
(``except FileNotFoundError`` works), timeouts subclass :class:`TimeoutError`, and bad arguments
:class:`ValueError`.
"""

from __future__ import annotations

import errno as _errno


class SandboxError(Exception):
    """The root of dormant's exceptions."""


class SnapshotNotFound(SandboxError):
    """No snapshot with this id is in the store."""


class SandboxNotFound(SandboxError):
    """No sandbox with this id is in the store: it was never checkpointed there, or it was
    killed (its snapshots stay, resumable by snapshot id)."""


class SnapshotCorrupt(SandboxError):
    """The snapshot exists but cannot be used (damaged, or written by an incompatible version)."""


class LimitExceeded(SandboxError):
    """The guest went past a limit of the sandbox (memory cap, output size)."""


class SandboxTimeout(SandboxError, TimeoutError):
    """A call ran past its deadline and was stopped."""


class InvalidState(SandboxError):
    """The sandbox's state does not allow the call (killed, or poisoned by a failed call)."""


class KvmUnavailable(SandboxError):
    """The KVM tier cannot run on this host (no usable ``/dev/kvm``)."""


class Unsupported(SandboxError):
    """This tier (or this sandbox's image) does not support the operation."""


class RuntimeMissing(SandboxError):
    """A component the sandbox needs is not installed; the message says how to get it."""


class InvalidArgument(SandboxError, ValueError):
    """An argument is invalid (unknown tier, bad path, bad spec)."""


class TemplateBuildError(SandboxError):
    """A template's build failed at a step: a ``run`` step (a command that exited non-zero on
    KVM, code that raised on WASI), the ``start`` command, or the wait for it to be ready. The
    message names the step and ends with its output; nothing was recorded."""


class PathEscape(SandboxError, PermissionError):
    """A path would leave the sandbox."""


class ReadOnly(SandboxError, PermissionError):
    """A write under a read-only volume."""


class StoreFull(SandboxError):
    """The snapshot store's filesystem is full: a checkpoint (or standby) could not be written.

    Nothing is lost: the sandbox keeps running with its state intact, and the next checkpoint
    after space is freed stores everything.
    """


class SandboxBusy(SandboxError):
    """Another host holds the sandbox's lease in the shared :class:`~dormant.Store`: one host
    at a time runs a sandbox. The message names the holder and when its lease expires; resume
    after that, or fork the sandbox for an independent copy."""


class LeaseLost(SandboxError):
    """This host's lease on the sandbox expired and another host took it over: its
    checkpoints here are refused, so they never overwrite the new holder's."""


class RemoteStoreError(SandboxError):
    """A request to the object store failed (network, credentials, a missing bucket). Nothing
    local was lost: a failed upload's snapshot stays in the local store; a durable checkpoint
    or :meth:`~dormant.Store.sync` uploads it again."""


class SandboxIOError(SandboxError, OSError):
    """A file operation failed inside the sandbox or in the snapshot store."""


class SandboxFileNotFoundError(SandboxIOError, FileNotFoundError):
    pass


class SandboxFileExistsError(SandboxIOError, FileExistsError):
    pass


class SandboxPermissionError(SandboxIOError, PermissionError):
    pass


class SandboxIsADirectoryError(SandboxIOError, IsADirectoryError):
    pass


class SandboxNotADirectoryError(SandboxIOError, NotADirectoryError):
    pass


_BY_KIND: dict[str, type[SandboxError]] = {
    "snapshot_not_found": SnapshotNotFound,
    "sandbox_not_found": SandboxNotFound,
    "snapshot_corrupt": SnapshotCorrupt,
    "limit_exceeded": LimitExceeded,
    "timeout": SandboxTimeout,
    "invalid_state": InvalidState,
    "interrupted": InvalidState,
    "kvm_unavailable": KvmUnavailable,
    "unsupported": Unsupported,
    "runtime_missing": RuntimeMissing,
    "invalid_argument": InvalidArgument,
    "path_escape": PathEscape,
    "read_only": ReadOnly,
    "store_full": StoreFull,
    "template_step": TemplateBuildError,
    "sandbox_busy": SandboxBusy,
    "lease_lost": LeaseLost,
    "remote": RemoteStoreError,
}

_BY_ERRNO: dict[int, type[SandboxIOError]] = {
    _errno.ENOENT: SandboxFileNotFoundError,
    _errno.EEXIST: SandboxFileExistsError,
    _errno.EACCES: SandboxPermissionError,
    _errno.EPERM: SandboxPermissionError,
    _errno.EISDIR: SandboxIsADirectoryError,
    _errno.ENOTDIR: SandboxNotADirectoryError,
}

_HINTS: dict[str, str] = {
    "snapshot_not_found": "dormant.list_snapshots() lists the snapshots in a store",
    "sandbox_not_found": "dormant.list_sandboxes() lists the sandboxes in a store",
    "snapshot_corrupt": "resume another snapshot, or remove this one with dormant.delete_snapshot()",
    "timeout": "pass a larger timeout= to the call or to Sandbox.create()",
    "limit_exceeded": "raise memory_mib= or output_limit= in Sandbox.create(), or produce less output",
    "interrupted": "resume the sandbox from a snapshot with dormant.Sandbox.resume()",
    "store_full": "free space on the store's filesystem, then checkpoint again; the sandbox is "
    "still running and nothing was lost",
}


def _from_native(
    kind: str, message: str, errno: int | None, path: str | None
) -> SandboxError:
    """Builds the exception for an error of the native module (called by it)."""
    hint = _HINTS.get(kind)
    if hint:
        message = f"{message} ({hint})"
    if kind == "io":
        cls: type[SandboxError] = _BY_ERRNO.get(errno or 0, SandboxIOError)
    else:
        cls = _BY_KIND.get(kind, SandboxError)
    if issubclass(cls, OSError):
        if errno is not None:
            return cls(errno, message, path) if path is not None else cls(errno, message)
        return cls(message)
    return cls(message)
