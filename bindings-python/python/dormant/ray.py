"""dormant on a Ray cluster: sandboxes as Ray actors that any node can host, backed by a shared
:class:`~dormant.Store` (an S3-compatible bucket).

One sandbox lives in one actor (a Ray worker process) at a time. The actor opens the bucket
with a cache of its node's own (``<cache_dir>/<Ray node id>``), creates a sandbox or resumes
one by id (:meth:`~dormant.Sandbox.connect`), holds its lease while it lives, and answers an
agent's calls with plain, picklable values. When the sandbox goes to standby (durably, the
default) its snapshot is in the bucket, its lease is released and the actor ends: the next
:meth:`SandboxPool.get` resumes it on whichever node Ray picks, or on the node asked for::

    import ray
    from dormant.ray import SandboxPool

    ray.init()
    pool = SandboxPool("s3://my-bucket/sandboxes", endpoint_url="http://minio:9000")

    sb = pool.create(tier="wasi")                 # an actor somewhere in the cluster
    sb.run_code("import pandas as pd; df = pd.DataFrame({'x': range(5)})")
    sb.standby()                                  # in the bucket; the actor ends

    sb = pool.get(sb.sandbox_id, node_id=other)   # resumed on another node
    print(sb.run_code("print(df.x.sum())").stdout)  # 10

Every node needs the bucket's credentials in its environment (``AWS_ACCESS_KEY_ID`` /
``AWS_SECRET_ACCESS_KEY``, or ``runtime_env={"env_vars": {...}}`` of :class:`SandboxPool`).

Routing: :meth:`SandboxPool.get` returns the live actor holding the sandbox when there is one,
found in the pool's registry (the sandboxes it created or resumed) or as the named actor
``dormant:<sandbox id>`` in the pool's Ray namespace (every actor that *resumed* a sandbox has
that name; an actor that *created* one is unnamed, because the id is known only once the
sandbox exists, so other pools find it only after its first standby). A sandbox held by a live
actor that the pool cannot see (another namespace, another pool's created sandbox, another
host outside Ray) raises :class:`dormant.SandboxBusy`, as any second host's resume does.

Errors keep their dormant types across Ray: a call raises :class:`dormant.SandboxBusy`,
:class:`dormant.SandboxTimeout`, :class:`dormant.LeaseLost`, ... as the sandbox raised it (not
a ``RayTaskError``; the Ray error, with the remote traceback, is its ``__cause__``), and a call
on an actor that has ended (after standby or kill, or with its node) raises
:class:`dormant.InvalidState`.

Actors ask Ray for ``num_cpus=0.1`` by default (a sleeping session costs nothing, and several
fit on a small node) and are never restarted by Ray (``max_restarts=0``): a lost actor's
sandbox is resumed from its last durable snapshot by the next :meth:`SandboxPool.get`, once its
lease expired (``lease_ttl`` seconds at most). Actors belong to the driver that started them
unless ``detached=True``: call :meth:`SandboxPool.close` (or use the pool as a context
manager) before the driver exits, or what changed since each sandbox's last checkpoint is
lost.

Needs Ray 2.60: ``pip install "dormant[ray]"``.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

try:
    import ray
    from ray.actor import ActorClass, ActorHandle
    from ray.exceptions import (
        ActorAlreadyExistsError,
        ActorDiedError,
        RayActorError,
        RayTaskError,
    )
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
except ImportError as _e:  # pragma: no cover - exercised without ray installed
    raise ImportError(
        f'dormant.ray needs Ray (2.60): pip install "dormant[ray]" ({_e})'
    ) from _e

from ._errors import InvalidArgument, InvalidState
from ._sandbox import (
    CommandResult,
    ExecutionError,
    Sandbox,
    Store,
    Tier,
    _seconds,
    default_store,
)

__all__ = [
    "CodeResult",
    "SandboxActor",
    "SandboxHandle",
    "SandboxPool",
    "SandboxWorker",
    "StoreConfig",
    "actor_name",
]

DEFAULT_NAMESPACE = "dormant"
DEFAULT_NUM_CPUS = 0.1
# How long get() goes on finding the named actor of a sandbox that is not ready: one that has
# ended but whose name Ray has not freed yet, or another pool's that has not opened the sandbox
# yet (a resume may pull the whole snapshot from the bucket).
_ROUTE_TIMEOUT = 120.0


def actor_name(sandbox_id: str) -> str:
    """The Ray name of the actor that resumed sandbox ``sandbox_id``: ``dormant:<id>``."""
    return f"dormant:{sandbox_id}"


@dataclass(frozen=True)
class StoreConfig:
    """How an actor opens the bucket: :class:`dormant.Store`'s arguments, with ``cache_dir`` a
    base directory on each node (default: ``<dormant.default_store()>/ray`` there), under
    which each node caches in a directory named by its Ray node id. ``lease_ttl`` and
    ``request_timeout`` are seconds (``None``: dormant's defaults, 30 s each)."""

    url: str
    endpoint_url: str | None = None
    cache_dir: str | None = None
    region: str | None = None
    lease_ttl: float | None = None
    request_timeout: float | None = None
    retries: int | None = None

    def node_cache_dir(self, node_id: str) -> str:
        """The cache directory of node ``node_id`` (a Ray node id, hex)."""
        base = self.cache_dir or os.path.join(default_store(), "ray")
        return os.path.join(base, node_id)

    def open(self, node_id: str) -> Store:
        """Opens the store on this node, caching in :meth:`node_cache_dir`."""
        return Store(
            self.url,
            endpoint_url=self.endpoint_url,
            cache_dir=self.node_cache_dir(node_id),
            region=self.region,
            lease_ttl=self.lease_ttl,
            request_timeout=self.request_timeout,
            retries=self.retries,
        )


@dataclass(frozen=True)
class CodeResult:
    """What one ``run_code`` produced, as plain values: ``stdout`` (a final expression's
    ``repr`` included) and ``stderr`` as text, ``error`` (the exception the code raised, or
    None when it ran to completion) and ``results``, the text representation of each rich
    result that has one, in the order they were made (see :class:`dormant.Execution`; images
    and HTML stay in the sandbox)."""

    stdout: str
    stderr: str
    error: ExecutionError | None
    results: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class _Info:
    sandbox_id: str
    node_id: str
    actor_id: str
    open: bool  # holds its sandbox
    ending: bool  # its sandbox went to standby (durably) or was killed: the actor ends


class SandboxWorker:
    """The code of a sandbox actor: one sandbox of a bucket, in one process of a Ray node.
    :data:`SandboxActor` is this class as a Ray actor; :class:`SandboxPool` starts and routes
    to them. It also works without Ray actors (then it runs in this process).

    Made with its :class:`StoreConfig`; :meth:`open` then creates or resumes the sandbox (the
    constructor does nothing that can fail, so that an error reaches the caller as an ordinary
    call's error). Every other call needs an open sandbox, and raises
    :class:`dormant.InvalidState` before :meth:`open` and after :meth:`standby` (durable) or
    :meth:`kill`, when the actor ends itself. Calls run one at a time."""

    def __init__(self, store: StoreConfig, idle_standby: float | None = None) -> None:
        self._config = store
        self._idle_standby = idle_standby
        self._store: Store | None = None
        self._sandbox: Sandbox | None = None
        self._closed: str | None = None

    # Lifecycle.

    def open(
        self,
        sandbox_id: str | None = None,
        tier: Tier = "wasi",
        create_kwargs: Mapping[str, Any] | None = None,
    ) -> tuple[str, str]:
        """Creates a sandbox (``sandbox_id`` None: :meth:`dormant.Sandbox.create` with
        ``tier`` and ``create_kwargs``) or resumes sandbox ``sandbox_id`` from the bucket
        (:meth:`dormant.Sandbox.connect`), holding its lease. Returns ``(sandbox id, Ray node
        id)``.

        Raises :class:`dormant.SandboxBusy` while another host holds the sandbox,
        :class:`dormant.SandboxNotFound` when the bucket has no snapshot of it,
        :class:`dormant.RemoteStoreError` when the bucket cannot be reached, and
        :class:`dormant.InvalidState` when this actor already has a sandbox."""
        if self._sandbox is not None or self._closed is not None:
            raise InvalidState("this actor already has a sandbox: one sandbox per actor")
        node_id = _node_id()
        store = self._config.open(node_id)
        if sandbox_id is None:
            kwargs = dict(create_kwargs or {})
            kwargs.setdefault("idle_standby", self._idle_standby)
            sb = Sandbox.create(tier, store=store, **kwargs)
        else:
            sb = Sandbox.connect(sandbox_id, store=store, idle_standby=self._idle_standby)
        self._store, self._sandbox = store, sb
        return sb.id, node_id

    def standby(self, durable: bool = True) -> str:
        """Puts the sandbox to standby; returns its snapshot id.

        ``durable=True`` (the default): returns once the snapshot is in the bucket and the
        lease released (any node can resume it now), and the actor then ends itself.
        ``durable=False``: returns once the snapshot is safe on this node; it uploads in the
        background and the lease is released once it is in; the actor stays, with the
        sandbox asleep (its memory freed), and its next call wakes it here, taking the lease
        again (:class:`dormant.SandboxBusy` if another host took it meanwhile).

        Raises :class:`dormant.RemoteStoreError` when the upload fails (the actor stays, the
        snapshot local; calling again retries) and :class:`dormant.LeaseLost` when another
        host took the sandbox over."""
        sb = self._open()
        snap = sb.standby(durable=durable)
        if durable:
            self._close(f"went to standby (snapshot {snap})")
        return snap

    def kill(self) -> None:
        """Ends the sandbox for good (:meth:`dormant.Sandbox.kill`: its snapshots stay, but
        :meth:`dormant.Sandbox.connect` no longer finds it) and releases its lease; the actor
        then ends itself."""
        sb = self._open()
        # The kill is in the bucket's head (no holder) once this returns; the snapshots this
        # sandbox queued before it finish uploading before the actor ends.
        sb.kill()
        if self._store is not None:
            self._store.flush()
        self._close("was killed")

    # The agent's calls.

    def id(self) -> str:
        """The sandbox's id (kept across standby and resume, on any node)."""
        return self._open().id

    def node_id(self) -> str:
        """The Ray node id (hex) of the node this actor runs on."""
        return _node_id()

    def info(self) -> _Info:
        """The sandbox id, node id, actor id, whether the sandbox is open here and whether the
        actor is ending."""
        actor_id = ray.get_runtime_context().get_actor_id() or ""
        sid = self._sandbox.id if self._sandbox is not None else ""
        ending = self._closed is not None
        return _Info(sid, _node_id(), actor_id, self._sandbox is not None and not ending, ending)

    def run_code(self, code: str, timeout: float | None = None) -> CodeResult:
        """Runs Python code in the session (:meth:`dormant.Sandbox.run_code`); variables and
        imports persist. An exception in the code is ``error``, not raised; ``timeout``
        (seconds) raises :class:`dormant.SandboxTimeout`."""
        e = self._open().run_code(code, timeout=timeout)
        return CodeResult(
            e.stdout, e.stderr, e.error, [r.text for r in e.results if r.text is not None]
        )

    def exec(
        self,
        cmd: str | Sequence[str],
        timeout: float | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
    ) -> CommandResult:
        """Runs a command to its end (:meth:`dormant.Commands.run`): ``stdout``, ``stderr``
        (text) and ``exit_code`` (non-zero is a result, not an error). ``timeout`` is in
        seconds."""
        return self._open().commands.run(cmd, timeout=timeout, env=env, cwd=cwd)

    def read_file(self, path: str) -> bytes:
        """A whole file of the sandbox (an absolute guest path); raises
        :class:`FileNotFoundError` (:class:`dormant.SandboxFileNotFoundError`) when missing."""
        return self._open().files.read(path)

    def write_file(self, path: str, data: bytes | str) -> None:
        """Writes a whole file (parents created), replacing it; ``str`` is written as UTF-8."""
        self._open().files.write(path, data)

    def checkpoint(self, durable: bool = False) -> str:
        """Writes a snapshot and returns its id; the sandbox keeps running here. With
        ``durable=True``, returns once it is in the bucket."""
        return self._open().checkpoint(durable=durable)

    # Internals.

    def _open(self) -> Sandbox:
        if self._closed is not None:
            raise InvalidState(
                f"sandbox {self._closed}; this actor is ending: SandboxPool.get() resumes it"
            )
        if self._sandbox is None:
            raise InvalidState("this actor has no sandbox yet: call open() first")
        return self._sandbox

    def _close(self, why: str) -> None:
        sid = self._sandbox.id if self._sandbox is not None else "?"
        self._closed = f"{sid} {why}"
        self._sandbox = None
        ctx = ray.get_runtime_context()
        if ctx.get_actor_id() is not None:
            # Ends the actor once this call has returned (queued after it), unlike
            # ray.actor.exit_actor(), whose caller would see the actor's death instead of the
            # result. (Ray keeps the name of an actor that ended so until every handle of it is
            # gone: SandboxHandle and SandboxPool also ray.kill() it, which frees the name.)
            ctx.current_actor.__ray_terminate__.remote()


def _node_id() -> str:
    return ray.get_runtime_context().get_node_id()


SandboxActor: ActorClass[SandboxWorker] = ray.remote(
    num_cpus=DEFAULT_NUM_CPUS, max_restarts=0, max_task_retries=0
)(SandboxWorker)
""":class:`SandboxWorker` as a Ray actor class (``num_cpus=0.1``, never restarted):
``SandboxActor.remote(StoreConfig(...))``, then ``actor.open.remote(...)``."""


def _call(actor: ActorHandle[SandboxWorker], sandbox_id: str, method: str, *args: object) -> Any:
    """Calls ``method`` of the actor and waits for its result, raising what the sandbox raised
    (unwrapped from Ray's ``RayTaskError``) or, when the actor has ended,
    :class:`dormant.InvalidState`."""
    try:
        return ray.get(getattr(actor, method).remote(*args))
    except RayTaskError as e:
        cause = e.cause
        if isinstance(cause, Exception) and not isinstance(cause, RayTaskError):
            raise cause from e
        raise
    except RayActorError as e:
        raise InvalidState(
            f"the actor of sandbox {sandbox_id or '(new)'} has ended (after standby or kill, or "
            "with its node): SandboxPool.get() resumes the sandbox from its last durable "
            f"snapshot ({e.__class__.__name__})"
        ) from e


class SandboxHandle:
    """A sandbox held by a live actor: the actor's calls, blocking until they return and
    raising dormant's exceptions (:class:`dormant.SandboxBusy`, :class:`dormant.SandboxTimeout`,
    ...; :class:`dormant.InvalidState` once the actor has ended). Safe to use from several
    threads (the actor runs the calls one at a time) and to pass to Ray tasks (pickled, it
    keeps the actor, not the pool)."""

    def __init__(
        self,
        actor: ActorHandle[SandboxWorker],
        sandbox_id: str,
        node_id: str,
        actor_id: str,
        pool: SandboxPool | None = None,
    ) -> None:
        self._actor = actor
        self._sandbox_id = sandbox_id
        self._node_id = node_id
        self._actor_id = actor_id
        self._pool = pool

    @property
    def actor(self) -> ActorHandle[SandboxWorker]:
        """The Ray actor (:data:`SandboxActor`), for calls of your own:
        ``ray.get(handle.actor.run_code.remote("1 + 1"))``."""
        return self._actor

    @property
    def sandbox_id(self) -> str:
        """The sandbox's id (:attr:`dormant.Sandbox.id`)."""
        return self._sandbox_id

    @property
    def id(self) -> str:
        """The same as :attr:`sandbox_id`."""
        return self._sandbox_id

    @property
    def node_id(self) -> str:
        """The Ray node id (hex) of the node the actor runs on."""
        return self._node_id

    @property
    def actor_id(self) -> str:
        """The Ray actor id (hex)."""
        return self._actor_id

    def run_code(self, code: str, *, timeout: float | None = None) -> CodeResult:
        """:meth:`SandboxWorker.run_code`: runs Python code in the session."""
        result: CodeResult = self._call("run_code", code, _seconds("timeout", timeout))
        return result

    def exec(
        self,
        cmd: str | Sequence[str],
        *,
        timeout: float | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
    ) -> CommandResult:
        """:meth:`SandboxWorker.exec`: runs a command to its end (``stdout``, ``stderr``,
        ``exit_code``)."""
        result: CommandResult = self._call(
            "exec", cmd, _seconds("timeout", timeout), None if env is None else dict(env), cwd
        )
        return result

    def read_file(self, path: str) -> bytes:
        """:meth:`SandboxWorker.read_file`: a whole file, as bytes."""
        data: bytes = self._call("read_file", path)
        return data

    def write_file(self, path: str, data: bytes | str) -> None:
        """:meth:`SandboxWorker.write_file`: writes a whole file."""
        if not isinstance(data, (bytes, str)):
            raise TypeError(f"data must be bytes or str, not {type(data).__name__}")
        self._call("write_file", path, data)

    def checkpoint(self, *, durable: bool = False) -> str:
        """:meth:`SandboxWorker.checkpoint`: a snapshot's id; the sandbox keeps running."""
        snap: str = self._call("checkpoint", durable)
        return snap

    def standby(self, *, durable: bool = True) -> str:
        """:meth:`SandboxWorker.standby`: the snapshot's id. With ``durable=True`` (the
        default) the snapshot is in the bucket, the lease released and the actor ending:
        :meth:`SandboxPool.get` resumes the sandbox, on any node."""
        snap: str = self._call("standby", durable)
        if durable:
            self._end()
        return snap

    def kill(self) -> None:
        """:meth:`SandboxWorker.kill`: ends the sandbox for good, and its actor."""
        self._call("kill")
        self._end()

    def alive(self) -> bool:
        """Whether the actor still runs with the sandbox open (one round trip). Raises Ray's
        ``ActorUnavailableError`` while the actor cannot be reached for now (it may come
        back)."""
        try:
            info: _Info = ray.get(getattr(self._actor, "info").remote())
        except ActorDiedError:
            return False
        return info.open

    def _call(self, method: str, *args: object) -> Any:
        return _call(self._actor, self._sandbox_id, method, *args)

    def _end(self) -> None:
        # The sandbox is closed (in the bucket, or killed) and the actor ending by itself:
        # killing it now also frees its name at once for the next get().
        ray.kill(self._actor, no_restart=True)
        if self._pool is not None:
            self._pool._forget(self)

    def __getstate__(self) -> dict[str, object]:
        state = dict(self.__dict__)
        state["_pool"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def __repr__(self) -> str:
        return f"<dormant.ray.SandboxHandle sandbox={self._sandbox_id} node={self._node_id[:12]}>"


class SandboxPool:
    """Sandboxes of one bucket as Ray actors: :meth:`create` starts one, :meth:`get` routes to
    the actor holding a sandbox or resumes it in a new one, :meth:`standby` puts one to sleep in
    the bucket (its actor ends).

    ``store_url`` (``"s3://bucket/prefix"``), ``endpoint_url``, ``region``, ``lease_ttl`` and
    ``request_timeout`` (seconds) and ``retries`` are :class:`dormant.Store`'s, for every
    actor; ``cache_dir`` is a base directory on each node, under which each node caches in a
    directory named by its Ray node id (default: ``<dormant.default_store()>/ray`` on the
    node). ``idle_standby`` (seconds) is passed to the sandboxes (default None: a sandbox runs
    until its actor is told otherwise; with a number, it sleeps after that long without calls
    and releases its lease, and its next call wakes it in the same actor).

    ``namespace`` is the Ray namespace of the named actors (``dormant:<sandbox id>``), which
    pools of one namespace share. ``num_cpus`` is each actor's CPU request (fractional: a
    sandbox mostly waits), ``runtime_env`` Ray's runtime environment for them (e.g.
    ``{"env_vars": {"AWS_ACCESS_KEY_ID": ...}}``), and ``detached=True`` makes actors outlive
    this driver (``lifetime="detached"``). Needs ``ray.init()`` first (or starts Ray as any Ray
    call does)."""

    def __init__(
        self,
        store_url: str,
        *,
        endpoint_url: str | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        lease_ttl: float | None = None,
        region: str | None = None,
        request_timeout: float | None = None,
        retries: int | None = None,
        idle_standby: float | None = None,
        namespace: str = DEFAULT_NAMESPACE,
        num_cpus: float = DEFAULT_NUM_CPUS,
        runtime_env: Mapping[str, Any] | None = None,
        detached: bool = False,
    ) -> None:
        if not isinstance(store_url, str) or not store_url.startswith("s3://"):
            raise InvalidArgument(f"store_url must be an s3:// URL, not {store_url!r}")
        _seconds("lease_ttl", lease_ttl)
        _seconds("request_timeout", request_timeout)
        _seconds("idle_standby", idle_standby)
        if isinstance(num_cpus, bool) or not isinstance(num_cpus, (int, float)) or num_cpus < 0:
            raise InvalidArgument(f"num_cpus must be a number >= 0, not {num_cpus!r}")
        if not isinstance(namespace, str) or not namespace:
            raise InvalidArgument(f"namespace must be a non-empty str, not {namespace!r}")
        self._config = StoreConfig(
            store_url,
            endpoint_url=endpoint_url,
            cache_dir=None if cache_dir is None else os.fspath(cache_dir),
            region=region,
            lease_ttl=lease_ttl,
            request_timeout=request_timeout,
            retries=retries,
        )
        self._idle_standby = idle_standby
        self._namespace = namespace
        self._num_cpus = float(num_cpus)
        self._runtime_env = None if runtime_env is None else dict(runtime_env)
        self._detached = detached
        self._lock = threading.Lock()
        self._registry: dict[str, SandboxHandle] = {}

    @property
    def store(self) -> StoreConfig:
        """How the actors open the bucket."""
        return self._config

    @property
    def namespace(self) -> str:
        """The Ray namespace of the named actors."""
        return self._namespace

    def create(
        self, tier: Tier = "wasi", node_id: str | None = None, **create_kwargs: Any
    ) -> SandboxHandle:
        """A new sandbox in a new actor: on node ``node_id`` (a Ray node id, hex) when given
        (:class:`~ray.util.scheduling_strategies.NodeAffinitySchedulingStrategy`, not soft:
        a node that is gone fails the call), else wherever Ray schedules it.
        ``create_kwargs`` go to :meth:`dormant.Sandbox.create` (``template``, ``image``,
        ``memory_mib``, ``timeout``, ``env``, ``output_limit``, ``network``, ``idle_standby``;
        picklable values only). Raises what the create raised (the actor is then ended)."""
        if "store" in create_kwargs or "progress" in create_kwargs:
            raise InvalidArgument("store= and progress= cannot be given to SandboxPool.create")
        actor = self._spawn(None, node_id)
        handle = self._open(actor, None, tier, create_kwargs)
        with self._lock:
            self._registry[handle.sandbox_id] = handle
        return handle

    def get(self, sandbox_id: str, node_id: str | None = None) -> SandboxHandle:
        """The live actor holding sandbox ``sandbox_id``, or a new one that resumed it.

        Looks in this pool's registry, then for the actor named ``dormant:<sandbox_id>`` in
        the pool's namespace; an actor found there is returned wherever it runs (``node_id``
        only places a new actor: to move a live sandbox, :meth:`standby` it first). Otherwise
        starts that named actor (on ``node_id`` when given, as in :meth:`create`), which
        resumes the sandbox's latest durable snapshot from the bucket; when another pool starts
        one at the same time, both get that one.

        Raises :class:`dormant.SandboxBusy` while a host this pool cannot see holds the
        sandbox (its lease), :class:`dormant.SandboxNotFound` when the bucket has none, and
        :class:`TimeoutError` when the sandbox's named actor is neither ready nor gone after
        two minutes."""
        if not isinstance(sandbox_id, str) or not sandbox_id:
            raise TypeError(f"sandbox_id must be a non-empty str, not {sandbox_id!r}")
        with self._lock:
            known = self._registry.get(sandbox_id)
        if known is not None:
            if known.alive():
                return known
            known._end()  # ended, or ending with its sandbox safe
        name = actor_name(sandbox_id)
        deadline = time.monotonic() + _ROUTE_TIMEOUT
        while True:
            existing = self._named(name)
            if existing is not None:
                found = self._route(existing, sandbox_id)
                if found is not None:
                    return found
            else:
                try:
                    actor = self._spawn(name, node_id)
                except ActorAlreadyExistsError:
                    pass  # another pool started it meanwhile: route to it
                else:
                    try:
                        handle = self._open(actor, sandbox_id, "wasi", None)
                    except InvalidState as e:
                        # Lost a race for the name (Ray checks it only when the actor is
                        # registered): route to the winner.
                        if not isinstance(e.__cause__, RayActorError) or self._named(name) is None:
                            raise
                    else:
                        with self._lock:
                            self._registry[sandbox_id] = handle
                        return handle
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"the actor {name!r} was neither ready nor gone after {_ROUTE_TIMEOUT:.0f} s"
                )
            time.sleep(0.02)

    def standby(self, sandbox_id: str, *, durable: bool = True) -> str | None:
        """Puts sandbox ``sandbox_id`` to standby in its live actor (this pool's, or the named
        one): :meth:`SandboxHandle.standby`. Returns the snapshot id, or None when no live
        actor the pool can see holds the sandbox (it is asleep in the bucket already, or held
        elsewhere)."""
        with self._lock:
            handle = self._registry.get(sandbox_id)
        if handle is None:
            actor = self._named(actor_name(sandbox_id))
            if actor is None:
                return None
            handle = self._route(actor, sandbox_id)
            if handle is None:
                return None
        try:
            return handle.standby(durable=durable)
        except InvalidState:
            if handle.alive():
                raise
            handle._end()
            return None

    def sandboxes(self) -> dict[str, SandboxHandle]:
        """This pool's registry: the sandboxes it created or resumed whose actors it has not
        seen end, by id."""
        with self._lock:
            return dict(self._registry)

    def close(self, *, durable: bool = True) -> None:
        """Puts every sandbox of the registry to standby (their actors end with
        ``durable=True``); raises the first error after trying them all."""
        first: BaseException | None = None
        for sid in list(self.sandboxes()):
            try:
                self.standby(sid, durable=durable)
            except Exception as e:  # noqa: BLE001 - the others still go to standby
                first = first or e
        if first is not None:
            raise first

    def __enter__(self) -> SandboxPool:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            self.close()
        except Exception:
            if exc is None:
                raise

    def __iter__(self) -> Iterator[SandboxHandle]:
        return iter(self.sandboxes().values())

    def __repr__(self) -> str:
        return (
            f"<dormant.ray.SandboxPool {self._config.url} namespace={self._namespace!r} "
            f"sandboxes={len(self._registry)}>"
        )

    # Internals.

    def _spawn(self, name: str | None, node_id: str | None) -> ActorHandle[SandboxWorker]:
        options: dict[str, Any] = {
            "num_cpus": self._num_cpus,
            "max_restarts": 0,
            "max_task_retries": 0,
            "namespace": self._namespace,
        }
        if name is not None:
            options["name"] = name
        if node_id is not None:
            if not isinstance(node_id, str):
                raise TypeError(f"node_id must be a str, not {type(node_id).__name__}")
            options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node_id, soft=False)
        if self._runtime_env is not None:
            options["runtime_env"] = self._runtime_env
        if self._detached:
            options["lifetime"] = "detached"
        actor = SandboxActor.options(**options).remote(self._config, self._idle_standby)
        if not isinstance(actor, ActorHandle):
            raise TypeError(f"Ray returned {type(actor).__name__}, not an ActorHandle")
        return actor

    def _open(
        self,
        actor: ActorHandle[SandboxWorker],
        sandbox_id: str | None,
        tier: Tier,
        create_kwargs: Mapping[str, Any] | None,
    ) -> SandboxHandle:
        try:
            opened: tuple[str, str] = _call(
                actor,
                sandbox_id or "",
                "open",
                sandbox_id,
                tier,
                None if create_kwargs is None else dict(create_kwargs),
            )
            sid, node = opened
            info: _Info = _call(actor, sid, "info")
        except BaseException:
            # The actor has no sandbox: end it (and free its name).
            ray.kill(actor, no_restart=True)
            raise
        return SandboxHandle(actor, sid, node, info.actor_id, self)

    def _named(self, name: str) -> ActorHandle[SandboxWorker] | None:
        try:
            actor: ActorHandle[SandboxWorker] = ray.get_actor(name, namespace=self._namespace)
        except ValueError:
            return None
        return actor

    def _route(self, actor: ActorHandle[SandboxWorker], sandbox_id: str) -> SandboxHandle | None:
        """A handle of ``actor`` if it holds ``sandbox_id`` open; None when it has ended or is
        ending (its sandbox safe in the bucket, or killed), after killing it to free its name.
        An actor that has not opened its sandbox yet (another pool's open has not reached it)
        is asked again until it has, for two minutes at most (then :class:`TimeoutError`)."""
        deadline = time.monotonic() + _ROUTE_TIMEOUT
        while True:
            try:
                info: _Info = ray.get(getattr(actor, "info").remote())
            except ActorDiedError:
                ray.kill(actor, no_restart=True)  # frees the name of an actor that ended
                return None
            if info.ending:
                ray.kill(actor, no_restart=True)
                return None
            if info.open:
                handle = SandboxHandle(actor, sandbox_id, info.node_id, info.actor_id, self)
                with self._lock:
                    self._registry[sandbox_id] = handle
                return handle
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"the actor of sandbox {sandbox_id} neither opened it nor ended within "
                    f"{_ROUTE_TIMEOUT:.0f} s"
                )
            time.sleep(0.02)

    def _forget(self, handle: SandboxHandle) -> None:
        with self._lock:
            if self._registry.get(handle.sandbox_id) is handle:
                del self._registry[handle.sandbox_id]
