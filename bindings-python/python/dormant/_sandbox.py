"""The public API: :class:`Sandbox` and the values its calls return."""

from __future__ import annotations

import atexit
import builtins
import datetime as _dt
import json
import os
import shlex
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Literal, Union, overload

from . import _native
from ._errors import InvalidArgument, SandboxTimeout
from ._pty import Ptys
from ._metrics import Metrics, _metrics
from ._progress import ProgressCallback, _native_progress

Tier = Literal["wasi", "kvm"]
OutputCallback = Callable[[str], object]
StrPath = Union[str, "os.PathLike[str]"]
StoreArg = Union[str, "os.PathLike[str]", "Store"]

_TIERS = ("wasi", "kvm")


def default_store() -> str:
    """The store used when none is given: ``$DORMANT_HOME`` if set, else the user's data
    directory (``~/.local/share/dormant``, or under ``$XDG_DATA_HOME``)."""
    home = os.environ.get("DORMANT_HOME")
    if home:
        return home
    data = os.environ.get("XDG_DATA_HOME") or os.path.join(
        os.path.expanduser("~"), ".local", "share"
    )
    return os.path.join(data, "dormant")


def _store(store: StoreArg | None) -> str:
    if store is None:
        return default_store()
    if isinstance(store, Store):
        return store._key
    if isinstance(store, (str, os.PathLike)):
        return os.fspath(store)
    raise TypeError(
        f"store must be a path (str or os.PathLike) or a dormant.Store, not {type(store).__name__}"
    )


@atexit.register
def _flush_uploads() -> None:
    # Background uploads and lease releases run on threads of this process: let them finish
    # before it ends (every object store it opened, by dormant.Store or by URL).
    import warnings

    for url, snapshot_id, error in _native.flush_all_remotes():
        warnings.warn(
            f"dormant: snapshot {snapshot_id} was not uploaded to {url} ({error}); it is only "
            "in the local store",
            RuntimeWarning,
            stacklevel=1,
        )


class Store:
    """A snapshot store in an S3-compatible bucket, shared by hosts: any host can resume any
    of its sandboxes, and snapshots outlive the loss of a host's disk. Pass it as ``store=``
    wherever a store is taken (:meth:`Sandbox.create`, :meth:`Sandbox.resume`,
    :meth:`Sandbox.connect`, :func:`list_snapshots`, :meth:`Template.build`).

    ``url`` is ``"s3://bucket"`` or ``"s3://bucket/prefix"``; the bucket must exist (dormant
    never creates one). Credentials come from ``AWS_ACCESS_KEY_ID`` /
    ``AWS_SECRET_ACCESS_KEY`` (or the profile, or the instance's role; ``anonymous=True``
    sends unsigned requests, for a public bucket); ``endpoint_url`` names
    an S3-compatible server (SeaweedFS, MinIO; default ``$AWS_ENDPOINT_URL``, else AWS).
    Sandboxes run from a local store, ``cache_dir`` (default: :func:`default_store`), which
    keeps what this host created or fetched.

    One host at a time runs a sandbox: creating or resuming one takes its lease, renewed in
    the background while it runs and released when it goes to standby, is killed or is
    dropped; a resume elsewhere meanwhile raises :class:`SandboxBusy`. A host that dies
    holding a lease blocks the sandbox for at most ``lease_ttl`` seconds (default 30); a host
    whose lease expired and was taken over gets :class:`LeaseLost` at its next checkpoint.

    :meth:`Sandbox.standby` and :meth:`Sandbox.checkpoint` return once the snapshot is safe
    locally and upload it in the background; with ``durable=True`` they return once it is in
    the bucket. ``request_timeout`` (seconds, default 30) bounds each request and its
    retries (``retries``, default 3). An upload that finds a chunk in the bucket written more
    than ``freshen_after`` seconds ago (default one day) writes it again, so that :meth:`gc`,
    whose grace period must be at least twice that, never removes a chunk an upload under way
    is about to reference. The server must honour conditional writes (``If-None-Match``,
    ``If-Match``: the leases rest on them); opening the store checks it."""

    def __init__(
        self,
        url: str,
        *,
        endpoint_url: str | None = None,
        cache_dir: StrPath | None = None,
        region: str | None = None,
        lease_ttl: float | None = None,
        request_timeout: float | None = None,
        retries: int | None = None,
        freshen_after: float | None = None,
        anonymous: bool = False,
    ) -> None:
        if not isinstance(url, str) or not url.startswith("s3://"):
            raise InvalidArgument(f"url must be an s3:// URL, not {url!r}")
        _seconds("lease_ttl", lease_ttl)
        _seconds("request_timeout", request_timeout)
        _seconds("freshen_after", freshen_after)
        if not isinstance(anonymous, bool):
            raise TypeError(f"anonymous must be a bool, not {type(anonymous).__name__}")
        if retries is not None:
            if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
                raise InvalidArgument(f"retries must be an int >= 0, not {retries!r}")
        self._url = url
        self._endpoint = endpoint_url
        self._cache_dir = _store(cache_dir)
        # The native module's name for this store (two stores of one URL stay apart).
        self._key = _native.open_remote(
            url,
            self._cache_dir,
            endpoint_url,
            region,
            lease_ttl,
            request_timeout,
            retries,
            freshen_after,
            anonymous,
        )

    @property
    def url(self) -> str:
        """The bucket and prefix, ``s3://bucket/prefix``."""
        return self._url

    @property
    def cache_dir(self) -> str:
        """The local store sandboxes run from."""
        return self._cache_dir

    def flush(self) -> builtins.list[tuple[str, str]]:
        """Waits until every upload this process queued is done; returns the failed ones as
        ``(snapshot_id, error)`` pairs (their snapshots stay in the local store; :meth:`sync`
        or a durable checkpoint uploads them again)."""
        return _native.flush_remote(self._key)

    def sync(self) -> None:
        """Uploads again every upload of this process that failed; raises if one still
        fails."""
        _native.sync_remote(self._key)

    def objects(self) -> builtins.list[tuple[str, int]]:
        """Every object under the store's prefix, as ``(key, bytes)``: ``chunks/<hash>``,
        ``snapshots/<id>`` and ``heads/<sandbox id>`` (see the README's layout)."""
        return _native.remote_objects(self._key)

    def head(self, sandbox_id: str) -> dict[str, object] | None:
        """The head of sandbox ``sandbox_id``: its latest durable ``snapshot``, its lease's
        ``holder`` (``{"host", "pid", "token"}`` or ``None``) and ``expires_unix_ms``,
        ``generation``; ``None`` when the bucket has none."""
        text = _native.remote_head(self._key, sandbox_id)
        if text is None:
            return None
        head: dict[str, object] = json.loads(text)
        return head

    def gc(self, grace: float | None = None) -> dict[str, int]:
        """Removes the chunks no snapshot references that were written more than ``grace``
        seconds ago (default 7 days; at least twice ``freshen_after``, else
        :class:`InvalidArgument`): safe while other hosts upload (an upload reusing an old
        chunk writes it again first). Snapshots and heads are never removed. Returns counts:
        ``snapshots``, ``chunks``, ``unreferenced_kept``, ``chunks_removed``, ``bytes_freed``
        (also ``dormant gc --store s3://...``)."""
        _seconds("grace", grace)
        snapshots, chunks, kept, removed, freed = _native.remote_gc(self._key, grace)
        return {
            "snapshots": snapshots,
            "chunks": chunks,
            "unreferenced_kept": kept,
            "chunks_removed": removed,
            "bytes_freed": freed,
        }

    def verify(self, snapshot_id: str) -> tuple[int, int]:
        """Checks that snapshot ``snapshot_id`` is whole in the bucket: its object, those of
        the chain it is layered on, and every chunk they reference. Returns ``(snapshots,
        chunks)`` checked; raises :class:`SnapshotCorrupt` naming what is missing, or
        :class:`SnapshotNotFound`."""
        return _native.remote_verify(self._key, snapshot_id)

    def __repr__(self) -> str:
        return f"Store({self._url!r}, endpoint_url={self._endpoint!r}, cache_dir={self._cache_dir!r})"


def _seconds(name: str, value: float | None, *, allow_none: bool = True) -> float | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number of seconds, not {type(value).__name__}")
    if not value >= 0:
        raise InvalidArgument(f"{name} must be a non-negative number of seconds, not {value}")
    return float(value)


def _path(path: object) -> str:
    if not isinstance(path, str):
        raise TypeError(f"a sandbox path must be a str, not {type(path).__name__}")
    if not path.startswith("/"):
        raise InvalidArgument(f"sandbox paths are absolute (start with '/'), not {path!r}")
    return path


def _positive_int(name: str, value: int | None) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    if value <= 0:
        raise InvalidArgument(f"{name} must be positive, not {value}")
    return value


def _tcp_port(name: str, value: int, *, zero: bool = False) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    low = 0 if zero else 1
    if not low <= value <= 65535:
        raise InvalidArgument(f"{name} must be a TCP port from {low} to 65535, not {value}")
    return value


def _env(env: Mapping[str, str] | None) -> list[tuple[str, str]]:
    if env is None:
        return []
    if not isinstance(env, Mapping):
        raise TypeError(f"env must be a mapping of str to str, not {type(env).__name__}")
    out = []
    for k, v in env.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise TypeError("env must map str to str")
        out.append((k, v))
    return out


@dataclass(frozen=True)
class Volume:
    """A host directory to mount in a sandbox: ``volumes={"/mnt/data": Volume("/srv/data",
    read_only=True)}``. Its contents are in no snapshot: they outlive every sandbox and are
    shared by all that mount it."""

    host: StrPath
    read_only: bool = False


def _volumes(volumes: Mapping[str, StrPath | Volume] | None) -> list[tuple[str, str, bool]]:
    """``volumes=`` as the native module takes it: ``(host, guest, read_only)``, host absolute."""
    vols: list[tuple[str, str, bool]] = []
    if volumes is None:
        return vols
    if not isinstance(volumes, Mapping):
        raise TypeError("volumes must map guest paths to host directories")
    for guest, v in volumes.items():
        if not isinstance(guest, str):
            raise TypeError("volume guest paths must be str")
        vol = v if isinstance(v, Volume) else Volume(v)
        if not isinstance(vol.host, (str, os.PathLike)):
            raise TypeError("a volume's host directory must be a path")
        vols.append((os.path.abspath(os.fspath(vol.host)), guest, bool(vol.read_only)))
    return vols


class NetworkPolicy:
    """Which destinations a KVM sandbox's guest may reach (``network=`` of
    :meth:`Sandbox.create` and :class:`Template`, :meth:`Sandbox.set_network`). Default: nothing
    (networking off). A destination is reachable when an ``allow`` entry matches it and no
    ``deny`` entry does. Entries:

    - ``"*"``: every destination except the host's own loopback;
    - ``"host"``: the host's ``127.0.0.1``, which the guest reaches as
      ``host.dormant.internal``;
    - a domain, ``"pypi.org"``, or every name under one, ``"*.github.com"``;
    - an IP address, ``"10.1.2.3"``, or a CIDR block, ``"10.0.0.0/8"``.

    Entries are checked here (:class:`InvalidArgument` names a bad one) and kept in their
    canonical spelling (lowercase names, CIDRs with the host bits cleared, duplicates dropped).
    ``NetworkPolicy.open()`` is ``allow=["*"]``."""

    __slots__ = ("_allow", "_deny")

    def __init__(self, allow: Sequence[str] = (), deny: Sequence[str] = ()) -> None:
        lists = []
        for what, entries in (("allow", allow), ("deny", deny)):
            if isinstance(entries, (str, bytes)) or not isinstance(entries, Sequence):
                raise TypeError(f"{what} must be a list of str entries, not {type(entries).__name__}")
            if not all(isinstance(e, str) for e in entries):
                raise TypeError(f"{what} entries must be str")
            lists.append(list(entries))
        a, d = _native.parse_network_policy(lists[0], lists[1])
        self._allow = tuple(a)
        self._deny = tuple(d)

    @classmethod
    def open(cls) -> NetworkPolicy:
        """Every destination except the host's loopback: ``allow=["*"]``."""
        return cls(allow=["*"])

    @property
    def allow(self) -> tuple[str, ...]:
        return self._allow

    @property
    def deny(self) -> tuple[str, ...]:
        return self._deny

    @property
    def is_off(self) -> bool:
        """Whether nothing is allowed."""
        return not self._allow

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, NetworkPolicy):
            return NotImplemented
        return (self._allow, self._deny) == (other._allow, other._deny)

    def __hash__(self) -> int:
        return hash((self._allow, self._deny))

    def __repr__(self) -> str:
        return f"NetworkPolicy(allow={list(self._allow)!r}, deny={list(self._deny)!r})"


NetworkArg = Union[NetworkPolicy, Literal["open"], None]


def _network(network: object) -> tuple[list[str], list[str]] | None:
    """``network=`` as the native module takes it: ``(allow, deny)``, or None for off."""
    if network is None:
        return None
    if isinstance(network, NetworkPolicy):
        return list(network.allow), list(network.deny)
    if isinstance(network, str):
        if network == "open":
            return ["*"], []
        raise InvalidArgument(
            f"network={network!r}: use None (off), \"open\", or dormant.NetworkPolicy(allow=[...], "
            "deny=[...])"
        )
    raise TypeError(
        f"network must be None, \"open\" or a dormant.NetworkPolicy, not {type(network).__name__}"
    )


@dataclass(frozen=True)
class ExecutionError:
    """An exception raised by code in ``run_code``."""

    name: str
    value: str
    traceback: str


@dataclass(frozen=True)
class Result:
    """One rich result of ``run_code``: the representations one object has, each None where it
    has none. The final expression's value (``is_main_result``) has ``text`` (its ``repr``) and
    whatever ``_repr_html_``, ``_repr_markdown_``, ``_repr_png_``, ``_repr_svg_`` and
    ``_repr_json_`` it defines gave (a pandas DataFrame: text and HTML); a matplotlib figure
    has ``png`` only (the PNG file's bytes, at the figure's size times its dpi)."""

    text: str | None = None
    html: str | None = None
    markdown: str | None = None
    png: bytes | None = None
    svg: str | None = None
    json: object | None = None
    """A JSON value (dict, list, str, int, float, bool) as ``json.loads`` gives it."""
    is_main_result: bool = False


@dataclass(frozen=True)
class Execution:
    """What one ``run_code`` produced; ``error`` is None when the code ran to completion.

    ``stdout`` is what the cell printed, a final expression's ``repr`` included (as a notebook
    shows it). ``results`` are its rich results in the order they were made: each matplotlib
    figure shown with ``plt.show()`` as it was called, then the final expression's value (the
    one with ``is_main_result``, unless it is None), then each figure left open at the end.
    Figures are closed after every cell, also one that raised. Empty for a session snapshotted
    by a dormant older than rich results, and on the KVM tier for figures when the image has
    no matplotlib."""

    stdout: str
    stderr: str
    error: ExecutionError | None
    results: list[Result] = field(default_factory=list)


@dataclass(frozen=True)
class CommandResult:
    """A finished command. A non-zero ``exit_code`` is a result, not an exception (128 + N
    when a signal N killed it)."""

    stdout: str
    stderr: str
    exit_code: int


@dataclass(frozen=True)
class EntryInfo:
    """A directory entry from ``files.list``."""

    name: str
    is_dir: bool
    size: int


@dataclass(frozen=True)
class SnapshotInfo:
    """A snapshot in a store."""

    id: str
    tier: str
    created: _dt.datetime
    bytes_stored: int


def _decode(data: bytes) -> str:
    return data.decode("utf-8", errors="replace")


def _text_callback(cb: OutputCallback | None, name: str) -> Callable[[bytes], object] | None:
    if cb is None:
        return None
    if not callable(cb):
        raise TypeError(f"{name} must be callable")
    return lambda chunk: cb(_decode(chunk))


class CommandHandle:
    """A background command (KVM tier): ``wait()`` for its result, ``kill()`` to stop it."""

    def __init__(
        self,
        native: _native.NativeSandbox,
        pid: int,
        on_stdout: OutputCallback | None,
        on_stderr: OutputCallback | None,
    ) -> None:
        self._native = native
        self.pid = pid
        self._out = bytearray()
        self._err = bytearray()
        self._on_stdout = on_stdout
        self._on_stderr = on_stderr
        self._exit_code: int | None = None

    def _collect(self) -> None:
        out, err, _ = self._native.output(self.pid)
        self._out += out
        self._err += err
        if out and self._on_stdout is not None:
            self._on_stdout(_decode(out))
        if err and self._on_stderr is not None:
            self._on_stderr(_decode(err))

    def wait(self, timeout: float | None = None) -> CommandResult:
        """Waits for the command to end (``timeout`` seconds at most, else
        :class:`SandboxTimeout`) and returns its output and exit code."""
        t = _seconds("timeout", timeout)
        if self._exit_code is None:
            code = self._native.wait(self.pid, t)
            if code is None:
                self._collect()
                raise SandboxTimeout(
                    f"command {self.pid} still runs after {t} s (wait again, or kill() it)"
                )
            self._exit_code = code
        self._collect()
        return CommandResult(_decode(bytes(self._out)), _decode(bytes(self._err)), self._exit_code)

    def kill(self) -> None:
        """Sends SIGKILL to the command's process group."""
        self._native.signal(self.pid, 9)

    def __repr__(self) -> str:
        return f"<CommandHandle pid={self.pid}>"


class Commands:
    """``sb.commands``: run programs in the sandbox."""

    def __init__(self, sandbox: Sandbox) -> None:
        self._sb = sandbox

    @overload
    def run(
        self,
        cmd: str | Sequence[str],
        *,
        background: Literal[False] = False,
        timeout: float | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        on_stdout: OutputCallback | None = None,
        on_stderr: OutputCallback | None = None,
    ) -> CommandResult: ...

    @overload
    def run(
        self,
        cmd: str | Sequence[str],
        *,
        background: Literal[True],
        timeout: float | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        on_stdout: OutputCallback | None = None,
        on_stderr: OutputCallback | None = None,
    ) -> CommandHandle: ...

    def run(
        self,
        cmd: str | Sequence[str],
        *,
        background: bool = False,
        timeout: float | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        on_stdout: OutputCallback | None = None,
        on_stderr: OutputCallback | None = None,
    ) -> CommandResult | CommandHandle:
        """Runs ``cmd``: a string is run by the guest shell (``bash -c`` on the KVM tier where the
        image has bash, else ``sh -c``; split
        into arguments on the WASI tier, whose commands are ``.wasm`` modules in the sandbox),
        a list is the argv. Returns a :class:`CommandResult`, or with ``background=True``
        (KVM tier) a :class:`CommandHandle`. ``on_stdout``/``on_stderr`` receive output as it
        comes (WASI tier: at the end; background commands: when ``wait`` collects it)."""
        native = self._sb._native
        shell = False
        if isinstance(cmd, str):
            shell = native.tier == "kvm"
            argv = [cmd] if shell else shlex.split(cmd)
        elif isinstance(cmd, Sequence) and all(isinstance(a, str) for a in cmd):
            argv = list(cmd)
        else:
            raise TypeError("cmd must be a str or a sequence of str")
        if not argv or not argv[0]:
            raise InvalidArgument("cmd is empty")
        if cwd is not None and not isinstance(cwd, str):
            raise TypeError("cwd must be a str")
        t = _seconds("timeout", timeout)
        pairs = _env(env)
        if background:
            pid = native.spawn(argv, pairs, cwd, shell)
            return CommandHandle(native, pid, on_stdout, on_stderr)
        out, err, code = native.exec(
            argv,
            pairs,
            cwd,
            t,
            _text_callback(on_stdout, "on_stdout"),
            _text_callback(on_stderr, "on_stderr"),
            shell,
        )
        return CommandResult(_decode(out), _decode(err), code)


class Files:
    """``sb.files``: the sandbox's files (paths are absolute guest paths; escapes are refused
    with :class:`PathEscape`)."""

    def __init__(self, sandbox: Sandbox) -> None:
        self._sb = sandbox

    def read(self, path: str) -> bytes:
        return self._sb._native.read(_path(path))

    def read_text(self, path: str, encoding: str = "utf-8") -> str:
        return self.read(path).decode(encoding)

    def write(self, path: str, data: bytes | bytearray | memoryview | str) -> None:
        """Writes a whole file (parents created), replacing it."""
        if isinstance(data, str):
            raw = data.encode("utf-8")
        elif isinstance(data, (bytes, bytearray, memoryview)):
            raw = bytes(data)
        else:
            raise TypeError(f"data must be bytes or str, not {type(data).__name__}")
        self._sb._native.write(_path(path), raw)

    def list(self, path: str = "/") -> builtins.list[EntryInfo]:
        return [EntryInfo(n, d, s) for n, d, s in self._sb._native.list(_path(path))]

    def remove(self, path: str) -> None:
        """Removes a file, or a directory with everything in it."""
        self._sb._native.remove(_path(path))

    def exists(self, path: str) -> bool:
        return self._sb._native.exists(_path(path))


class Sandbox:
    """A persistent sandbox: a Python session (``tier="wasi"``) or a Linux microVM
    (``tier="kvm"``). Use :meth:`create` or :meth:`resume`.

    Used as a context manager, the sandbox goes to standby on exit (its snapshot id stays in
    :attr:`snapshot_id`, for :meth:`resume` later, in this process or another)."""

    def __init__(self, native: _native.NativeSandbox, store: str, snapshot_id: str | None = None):
        self._native = native
        self._store = store
        self._snapshot_id = snapshot_id
        self.commands = Commands(self)
        self.files = Files(self)
        self.pty = Ptys(native)

    @classmethod
    def create(
        cls,
        tier: Tier | None = None,
        *,
        template: str | None = None,
        image: str | None = None,
        store: StoreArg | None = None,
        memory_mib: int | None = None,
        timeout: float | None = None,
        idle_standby: float | None = 15.0,
        env: Mapping[str, str] | None = None,
        volumes: Mapping[str, StrPath | Volume] | None = None,
        output_limit: int | None = None,
        network: NetworkArg = None,
        progress: ProgressCallback | None = None,
    ) -> Sandbox:
        """A new sandbox: a Python session (``tier="wasi"``, the default) or a Linux microVM
        (``tier="kvm"``). ``image`` names the microVM's root filesystem (``"base"``, Debian, the
        default; ``"coding"``; ``"minimal"``, busybox; an image of yours; or a path) and implies
        ``tier="kvm"``. ``memory_mib`` caps guest memory (WASI: 2 GiB by default; KVM: the
        guest's RAM, 256 MiB by default); ``timeout`` is the default deadline of each call in
        seconds; ``output_limit`` caps the bytes a call may write to stdout and to stderr each
        (16 MiB by default; past it the call raises :class:`LimitExceeded`); after
        ``idle_standby`` seconds without calls the sandbox goes to standby by itself and the next
        call wakes it (``None``: never); ``volumes`` maps guest paths to host directories (or
        :class:`Volume`).

        ``network`` is the egress policy of a Linux microVM: ``None``, the default, is no
        network at all; ``"open"`` reaches everything but the host's loopback; a
        :class:`NetworkPolicy` reaches what it allows (``NetworkPolicy(allow=["host"])``: the
        host's ``127.0.0.1`` as ``host.dormant.internal``). The WASI tier has no sockets: a
        network there raises :class:`Unsupported`. :meth:`set_network` changes it later.

        ``template`` names a built :class:`Template`: the sandbox resumes its snapshot under a
        new id, on the template's tier (a different ``tier`` is an :class:`InvalidArgument`),
        with everything else the template's; ``volumes`` then grants host directories to the
        template's mount points (those left out show an empty, read-only directory), and
        ``network``, when given, replaces the template's policy.

        ``progress``, if given, is called with a :class:`ProgressEvent` (unit ``"steps"``) as
        the create moves, and once at the end (``finished=True``, stage ``"sandbox ready"``).
        A Linux microVM whose base (the booted image, per image and ``memory_mib``) is not
        cached yet boots it first, which can take minutes: its events are ``"boot: kernel"``
        (then ``"boot: kernel — LINE"``, the serial console's last line, as it changes, step
        0 of 4), ``"boot: agent answered"`` (1), ``"boot: snapshot of the base"`` (2) and
        ``"boot: resume the base"`` (3); a cached base gives the final event only (``"sandbox
        ready (base cached)"``). The WASI tier and ``template=`` report the final event only.
        It runs on the create's thread; an exception it raises is raised when the create
        returns (the sandbox it made is killed)."""
        report = _native_progress(progress)
        if tier is not None:
            if not isinstance(tier, str):
                raise TypeError(f"tier must be a str, not {type(tier).__name__}")
            if tier not in _TIERS:
                raise InvalidArgument(
                    f"unknown tier {tier!r}: use 'wasi' (Python sessions) or 'kvm' (Linux "
                    "microVMs)"
                )
        vols = _volumes(volumes)
        root = _store(store)
        idle = _seconds("idle_standby", idle_standby)
        net = _network(network)
        if template is not None:
            if not isinstance(template, str):
                raise TypeError(f"template must be a str, not {type(template).__name__}")
            given = [
                name
                for name, value in (
                    ("image", image),
                    ("memory_mib", memory_mib),
                    ("timeout", timeout),
                    ("env", env),
                    ("output_limit", output_limit),
                )
                if value is not None
            ]
            if given:
                raise InvalidArgument(
                    f"{', '.join(given)} cannot be given with template=: a sandbox from a "
                    "template has the template's; build a template with them"
                )
            native = _native.NativeSandbox.from_template(template, root, idle, vols, tier)
            try:
                if net is not None:
                    native.set_network(*net)
                if report is not None:
                    report("sandbox ready", 1, 1, "steps", True)
            except BaseException:
                native.kill()
                raise
            return cls(native, root)
        if image is not None:
            if not isinstance(image, str):
                raise TypeError(f"image must be a str, not {type(image).__name__}")
            if tier is None:
                tier = "kvm"
            elif tier != "kvm":
                raise InvalidArgument(
                    f"image= is a Linux root filesystem, for tier='kvm', not {tier!r} (leave "
                    "tier out)"
                )
        native = _native.NativeSandbox.create(
            tier or "wasi",
            root,
            _positive_int("memory_mib", memory_mib),
            _seconds("timeout", timeout),
            idle,
            _env(env),
            vols,
            _positive_int("output_limit", output_limit),
            image,
            net,
            report,
        )
        return cls(native, root)

    @classmethod
    def resume(
        cls,
        snapshot_id: str,
        *,
        store: StoreArg | None = None,
        idle_standby: float | None = 15.0,
        volumes: Mapping[str, StrPath | Volume] | None = None,
        detach_missing: bool = False,
    ) -> Sandbox:
        """The sandbox of a snapshot (from ``checkpoint``, ``standby`` or ``snapshot_id``),
        running again exactly where it was: in this process or any other.

        A snapshot never grants access to host directories: ``volumes`` (as in :meth:`create`)
        gives them again, one for each of the snapshot's mount points (a read-only one must be
        given read-only; one the snapshot did not have is refused). A mount point without a
        volume is an :class:`InvalidArgument` naming it, unless ``detach_missing=True``: it
        then shows an empty, read-only directory. The sandbox keeps these volumes when it goes
        to standby and wakes, and its forks get them too."""
        if not isinstance(snapshot_id, str):
            raise TypeError(f"snapshot_id must be a str, not {type(snapshot_id).__name__}")
        if not isinstance(detach_missing, bool):
            raise TypeError(f"detach_missing must be a bool, not {type(detach_missing).__name__}")
        vols = _volumes(volumes)
        root = _store(store)
        native = _native.NativeSandbox.resume(
            snapshot_id, root, _seconds("idle_standby", idle_standby), vols, detach_missing
        )
        return cls(native, root, snapshot_id)

    @classmethod
    def connect(
        cls,
        sandbox_id: str,
        *,
        store: StoreArg | None = None,
        idle_standby: float | None = 15.0,
        volumes: Mapping[str, StrPath | Volume] | None = None,
        detach_missing: bool = False,
    ) -> Sandbox:
        """The sandbox ``sandbox_id`` (its :attr:`id`), running again from its latest snapshot
        in ``store``: :meth:`resume` of the snapshot :func:`list_sandboxes` reports for it, with
        the same ``volumes`` and ``detach_missing``. A sandbox's state reaches the store when it
        checkpoints or goes to standby (by itself after ``idle_standby``, or on leaving a
        ``with`` block), so this finds what it had then.

        Raises :class:`SandboxNotFound` when no snapshot of the sandbox is in the store, or when
        the sandbox was killed (:meth:`kill`) and not checkpointed since. Two handles connected
        to one sandbox run independently from the same snapshot (as two resumes do) in a local
        store; in a :class:`Store` (a bucket) one host at a time holds it: its lease is taken
        first, then the latest durable snapshot its head names is resumed
        (:class:`SandboxBusy` while another host holds it)."""
        if not isinstance(sandbox_id, str):
            raise TypeError(f"sandbox_id must be a str, not {type(sandbox_id).__name__}")
        if not isinstance(detach_missing, bool):
            raise TypeError(f"detach_missing must be a bool, not {type(detach_missing).__name__}")
        vols = _volumes(volumes)
        root = _store(store)
        native, snapshot_id = _native.NativeSandbox.connect(
            sandbox_id, root, _seconds("idle_standby", idle_standby), vols, detach_missing
        )
        return cls(native, root, snapshot_id)

    @property
    def id(self) -> str:
        """The sandbox's identity (kept across checkpoint, standby and resume)."""
        return self._native.id

    @property
    def tier(self) -> Tier:
        return "kvm" if self._native.tier == "kvm" else "wasi"

    @property
    def state(self) -> str:
        """``"running"``, ``"standby"``, ``"poisoned"`` (a call failed: resume a snapshot) or
        ``"killed"``."""
        return self._native.state

    @property
    def snapshot_id(self) -> str | None:
        """The latest snapshot this handle took or resumed (None before any)."""
        return self._snapshot_id

    @property
    def store(self) -> str:
        """The snapshot store's directory; for a :class:`Store`, its name in this process
        (``s3://bucket/prefix#n``), which ``store=`` accepts back."""
        return self._store

    @property
    def network(self) -> NetworkPolicy:
        """The egress policy in force (``NetworkPolicy()``, allowing nothing, when networking
        is off); reading it does not wake a sleeping sandbox. WASI tier:
        :class:`Unsupported`."""
        allow, deny = self._native.network()
        return NetworkPolicy(allow, deny)

    def set_network(self, network: NetworkArg) -> None:
        """Replaces the egress policy (as ``network=`` of :meth:`create`; ``None`` turns the
        network off) while the sandbox runs: new connections and DNS lookups follow it at
        once, and its snapshots record it from now on. A sleeping sandbox is woken for it.
        WASI tier: :class:`Unsupported`."""
        allow, deny = _network(network) or ([], [])
        self._native.set_network(allow, deny)

    def run_code(self, code: str, *, timeout: float | None = None) -> Execution:
        """Runs Python code in the session; variables, imports and data persist between calls
        (and across standby and resume). On the KVM tier the session is a ``python3`` in the
        guest, started by the first call; an image without python3 raises
        :class:`Unsupported` (create the sandbox with ``image="coding"``). An exception in the
        code is a result (``.error``), not raised; ``timeout`` raises :class:`SandboxTimeout`.
        Ctrl-C interrupts it (WASI: the sandbox is then poisoned, resume a snapshot; KVM: the
        cell gets a ``KeyboardInterrupt`` and the session goes on)."""
        if not isinstance(code, str):
            raise TypeError(f"code must be a str, not {type(code).__name__}")
        out, err, error, results = self._native.run_code(code, _seconds("timeout", timeout))
        return Execution(
            out,
            err,
            ExecutionError(*error) if error is not None else None,
            [
                Result(text, html, md, png, svg, None if js is None else json.loads(js), main)
                for text, html, md, png, svg, js, main in results
            ],
        )

    def checkpoint(self, *, durable: bool = False) -> str:
        """Writes a durable snapshot and returns its id; the sandbox keeps running.

        In a :class:`Store` (a bucket) the snapshot uploads in the background; with
        ``durable=True`` the call returns once it is in the bucket (raising
        :class:`RemoteStoreError` if the upload fails: the snapshot stays local, its id in
        :attr:`snapshot_id`, and a durable :meth:`standby` or :meth:`Store.sync` retries).
        Raises :class:`LeaseLost` once another host took the sandbox over."""
        self._snapshot_id = self._native.checkpoint()
        if durable:
            self._native.wait_durable(self._snapshot_id)
        return self._snapshot_id

    def standby(self, *, durable: bool = False) -> str:
        """Checkpoints, then frees all compute and memory; the next call wakes the sandbox.

        In a :class:`Store` (a bucket) the snapshot uploads in the background and the
        sandbox's lease is released once it is in; with ``durable=True`` the call returns
        once it is in the bucket (then any host can resume it). A failed upload raises
        :class:`RemoteStoreError`; the snapshot stays local (its id in :attr:`snapshot_id`),
        and calling again retries."""
        self._snapshot_id = self._native.standby()
        if durable:
            self._native.wait_durable(self._snapshot_id)
        return self._snapshot_id

    def fork(self, n: int = 1) -> builtins.list[Sandbox]:
        """``n`` independent copies of the running sandbox (each with its own id and the
        parent's volumes)."""
        if isinstance(n, bool) or not isinstance(n, int):
            raise TypeError(f"n must be an int, not {type(n).__name__}")
        if n < 1:
            raise InvalidArgument(f"n must be at least 1, not {n}")
        return [Sandbox(c, self._store) for c in self._native.fork(n)]

    def kill(self) -> None:
        """Ends the sandbox for good. Its snapshots stay in the store (:meth:`resume` still
        takes them by snapshot id), but the sandbox leaves :func:`list_sandboxes` and
        :meth:`connect` no longer finds it, unless it is resumed from one of them and
        checkpointed again."""
        self._native.kill()

    def expose(self, port: int, *, host_port: int = 0) -> str:
        """Makes the TCP server on guest port ``port`` reachable from this machine and returns
        the address to connect to, ``"127.0.0.1:NNNNN"``: a listener on the host's loopback
        (on ``host_port``, or a free port with ``0``) whose connections reach ``127.0.0.1:port``
        inside the guest (a dev server bound to the guest's loopback works, with outbound
        networking off). Exposing an exposed port again returns its address.

        The exposed ports belong to the sandbox: they come back when it resumes (here or in
        another process; on the same host port when free, else on a new one, which
        :attr:`exposed` tells), and a sandbox asleep after ``idle_standby`` keeps listening:
        a connection wakes it and is served. Connections open when the sandbox goes to standby
        end (the client sees the connection closed). A fork's children expose nothing.

        Raises :class:`Unsupported` on the WASI tier (WASI has no sockets), and
        :class:`SandboxError` when ``host_port`` is in use."""
        return self._native.expose(
            _tcp_port("port", port), _tcp_port("host_port", host_port, zero=True)
        )

    def get_host(self, port: int) -> str:
        """The host address of guest port ``port``, exposing it first if needed:
        ``sb.expose(port)``."""
        return self.expose(port)

    def unexpose(self, port: int) -> None:
        """Stops exposing guest port ``port``: its listener closes and its open connections
        end. A port that is not exposed: nothing to do."""
        self._native.unexpose(_tcp_port("port", port))

    @property
    def exposed(self) -> dict[int, str]:
        """The exposed ports: ``{guest_port: "127.0.0.1:NNNNN"}``, by guest port. Raises
        :class:`Unsupported` on the WASI tier."""
        return {guest: f"127.0.0.1:{host}" for guest, host in self._native.exposed()}

    def metrics(self) -> Metrics:
        """What this sandbox has used: CPU time (seconds), memory in use and its limit, disk
        bytes written (since it was created or resumed in this process, across standby), and
        the bytes its snapshots take in the store, own and shared (see :class:`Metrics`).
        Never wakes a sandbox in standby: it reports 0 memory and the counters it kept."""
        return _metrics(self._native, self._store)

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.state in ("running", "standby"):
            try:
                self.standby()
            except Exception:
                if exc is None:
                    raise

    def __repr__(self) -> str:
        return f"<dormant.Sandbox id={self.id} tier={self.tier} state={self.state}>"


def list_snapshots(store: StoreArg | None = None) -> list[SnapshotInfo]:
    """Every snapshot in the store, oldest first."""
    return [
        SnapshotInfo(
            id,
            tier,
            _dt.datetime.fromtimestamp(ms / 1000, tz=_dt.timezone.utc),
            size,
        )
        for id, tier, ms, size in _native.list_snapshots(_store(store))
    ]


@dataclass(frozen=True)
class SandboxInfo:
    """A sandbox in a store, as :func:`list_sandboxes` reports it: ``id`` (what
    :meth:`Sandbox.connect` takes), its ``tier``, its latest snapshot (``snapshot_id``, taken
    at ``updated``) and how many of the store's snapshots were taken of it."""

    id: str
    tier: Tier
    snapshot_id: str
    updated: _dt.datetime
    snapshots: int


def list_sandboxes(store: StoreArg | None = None) -> list[SandboxInfo]:
    """The sandboxes whose snapshots are in the store, by id: every sandbox that checkpointed
    or went to standby there, except killed ones (see :meth:`Sandbox.kill`). Templates' build
    sandboxes are not listed. A sandbox that never wrote a snapshot is in no store."""
    return [
        SandboxInfo(
            sandbox_id,
            "kvm" if tier == "kvm" else "wasi",
            snapshot_id,
            _dt.datetime.fromtimestamp(ms / 1000, tz=_dt.timezone.utc),
            count,
        )
        for sandbox_id, tier, snapshot_id, ms, count in _native.list_sandboxes(_store(store))
    ]


def delete_snapshot(snapshot_id: str, store: StoreArg | None = None) -> None:
    """Deletes a snapshot (refused while incremental snapshots are layered on it)."""
    if not isinstance(snapshot_id, str):
        raise TypeError(f"snapshot_id must be a str, not {type(snapshot_id).__name__}")
    _native.delete_snapshot(snapshot_id, _store(store))


def kvm_available() -> tuple[bool, str]:
    """Whether this host can run the KVM tier, and what it offers or lacks."""
    return _native.kvm_status()


@dataclass(frozen=True)
class TemplateInfo:
    """A built template, as :func:`list_templates` reports it."""

    name: str
    tier: Tier
    snapshot_id: str
    created: _dt.datetime


class Template:
    """An environment prepared once and resumed by every sandbox created from it
    (``Sandbox.create(template=name)``)::

        tpl = dormant.Template("www", image="minimal",
                               files={"/www/index.html": "hello"},
                               run=["mkdir -p /www/logs"],
                               start="httpd -f -p 8080 -h /www", ready_port=8080)
        tpl.build()                                   # cached by content hash
        sb = dormant.Sandbox.create(template="www")   # a new sandbox from it

    ``tier`` defaults to ``"kvm"`` when ``image`` is given, else ``"wasi"``. ``files`` maps
    absolute guest paths to contents (``str`` or ``bytes``), written first. ``run`` steps are
    shell commands on KVM (a non-zero exit fails the build) and code cells on WASI (an
    exception fails it; variables and imports stay in the template). ``start`` is a shell
    command left running in the background (KVM only); ``ready_port`` (something accepts TCP
    on ``127.0.0.1:PORT`` in the guest) or ``ready_cmd`` (a shell command exits 0) says when it
    is ready. ``volumes`` (as in :meth:`Sandbox.create`) are mounted while building; a sandbox
    from the template gets them only where its ``volumes=`` grants them again. ``env`` and
    ``memory_mib`` are as in :meth:`Sandbox.create`; so is ``network`` (KVM only), the policy
    of the build's steps and of the sandboxes created from the template.

    Names are 1-64 characters of letters, digits, ``.``, ``_`` and ``-``."""

    def __init__(
        self,
        name: str,
        *,
        tier: Tier | None = None,
        image: str | None = None,
        files: Mapping[str, str | bytes] | None = None,
        run: Sequence[str] | None = None,
        start: str | None = None,
        ready_port: int | None = None,
        ready_cmd: str | None = None,
        volumes: Mapping[str, StrPath | Volume] | None = None,
        env: Mapping[str, str] | None = None,
        memory_mib: int | None = None,
        network: NetworkArg = None,
    ) -> None:
        if not isinstance(name, str):
            raise TypeError(f"name must be a str, not {type(name).__name__}")
        if tier is None:
            tier = "kvm" if image is not None else "wasi"
        if not isinstance(tier, str) or tier not in _TIERS:
            raise InvalidArgument(f"unknown tier {tier!r}: use 'wasi' or 'kvm'")
        for what, value in (("image", image), ("start", start), ("ready_cmd", ready_cmd)):
            if value is not None and not isinstance(value, str):
                raise TypeError(f"{what} must be a str, not {type(value).__name__}")
        if isinstance(run, (str, bytes)):
            raise TypeError("run must be a list of steps (str), not a single str")
        steps = list(run or [])
        if not all(isinstance(s, str) for s in steps):
            raise TypeError("run steps must be str")
        contents: list[tuple[str, bytes]] = []
        if files is not None:
            if not isinstance(files, Mapping):
                raise TypeError("files must map guest paths to str or bytes")
            for path, data in files.items():
                if isinstance(data, str):
                    data = data.encode()
                elif not isinstance(data, (bytes, bytearray, memoryview)):
                    raise TypeError(f"file {path!r}: contents must be str or bytes")
                contents.append((_path(path), bytes(data)))
        if ready_port is not None:
            if isinstance(ready_port, bool) or not isinstance(ready_port, int):
                raise TypeError(f"ready_port must be an int, not {type(ready_port).__name__}")
            if not 1 <= ready_port <= 65535:
                raise InvalidArgument(f"ready_port must be a TCP port (1-65535), not {ready_port}")
        if ready_port is not None and ready_cmd is not None:
            raise InvalidArgument("give ready_port or ready_cmd, not both")
        self.name = name
        self.tier: Tier = "kvm" if tier == "kvm" else "wasi"
        self._image = image
        self._files = contents
        self._run = steps
        self._start = start
        self._ready_port = ready_port
        self._ready_cmd = ready_cmd
        self._volumes = _volumes(volumes)
        self._env = _env(env)
        self._memory_mib = _positive_int("memory_mib", memory_mib)
        self._network = _network(network)
        self._snapshot_id: str | None = None
        self._built: bool | None = None

    def build(
        self, store: StoreArg | None = None, *, progress: ProgressCallback | None = None
    ) -> str:
        """Builds the template into ``store`` and returns its snapshot id, or returns at once
        when the same recipe (and the same runtime) was built before and its snapshot is still
        there. A failing step raises :class:`TemplateBuildError` with the step and the end of
        its output; nothing is recorded then.

        ``progress``, if given, is called with a :class:`ProgressEvent` (unit ``"steps"``) as
        each step starts (creating the sandbox, each file, each ``run`` step, the start
        command, the readiness wait, the checkpoint) and once at the end (``finished=True``).
        It runs on the build's thread; an exception it raises is raised when the build returns."""
        snapshot_id, built = _native.build_template(
            self.name,
            self.tier,
            _store(store),
            self._image,
            self._memory_mib,
            self._env,
            self._volumes,
            self._files,
            self._run,
            self._start,
            self._ready_port,
            self._ready_cmd,
            self._network,
            _native_progress(progress),
        )
        self._snapshot_id = snapshot_id
        self._built = built
        return snapshot_id

    @property
    def snapshot_id(self) -> str | None:
        """The snapshot of the last :meth:`build` (None before one)."""
        return self._snapshot_id

    @property
    def built(self) -> bool | None:
        """Whether the last :meth:`build` built the template (``False``: it reused the recorded
        build; None before one)."""
        return self._built

    def __repr__(self) -> str:
        return f"<dormant.Template {self.name!r} tier={self.tier} snapshot={self._snapshot_id}>"


def list_templates(store: StoreArg | None = None) -> list[TemplateInfo]:
    """The templates built in the store, by name."""
    return [
        TemplateInfo(
            name,
            "kvm" if tier == "kvm" else "wasi",
            snapshot_id,
            _dt.datetime.fromtimestamp(ms / 1000, tz=_dt.timezone.utc),
        )
        for name, tier, snapshot_id, ms in _native.list_templates(_store(store))
    ]


@dataclass(frozen=True)
class ImageInfo:
    """A Linux root filesystem image in the cache (KVM tier), as :func:`list_images` and
    :func:`build_image` report it."""

    name: str
    path: str
    fingerprint: str


def build_image(
    name: str,
    *,
    packages: Sequence[str] | None = None,
    rootfs: StrPath | None = None,
    progress: ProgressCallback | None = None,
) -> ImageInfo:
    """Builds the Linux root filesystem image ``name`` for ``Sandbox.create(image=name)``, or
    finds it built: ``"base"``/``"coding"`` (built-in), ``packages=[...]`` (``base`` plus these
    Debian packages), or ``rootfs=`` (a directory, or a tar archive such as ``docker
    export``'s). Cached by a hash of the recipe; needs root and apt (mmdebstrap). Raises
    :class:`InvalidArgument` for a bad name or package, :class:`RuntimeMissing` where it
    cannot build here.

    ``progress``, if given, is called with a :class:`ProgressEvent` (unit ``"steps"``, 3 in
    all) as the build moves: step 0 while the root filesystem is made (``"image NAME: packages
    (mmdebstrap)"`` or ``"image NAME: root filesystem from PATH"``), 1 for the ext4
    filesystem, 2 once built, with a tool's output line as ``"STAGE — LINE"``; then a final
    event (``finished=True``, ``"image NAME ready"``). An image found in the cache gives the
    final event only (``"image NAME ready (cached)"``). It runs on the build's thread; an
    exception it raises is raised when the build returns."""
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, not {type(name).__name__}")
    pkgs = None
    if packages is not None:
        if isinstance(packages, str) or not all(isinstance(p, str) for p in packages):
            raise TypeError("packages must be a sequence of str")
        pkgs = list(packages)
    root = None if rootfs is None else os.fspath(rootfs)
    return ImageInfo(*_native.build_image(name, pkgs, root, _native_progress(progress)))


def list_images() -> list[ImageInfo]:
    """The Linux root filesystem images built into the cache (``"minimal"``, in the
    initramfs, is always there and not listed)."""
    return [ImageInfo(*i) for i in _native.list_images()]
