"""dormant.ray: sandboxes as Ray actors on a two-node Ray cluster (ray.cluster_utils.Cluster,
both nodes on this machine, each with a cache of its own), backed by a real SeaweedFS on
127.0.0.1: a session moves from node 1 to node 2 with its state, a live sandbox is routed to
its actor, and a sandbox held by a live actor cannot be resumed elsewhere."""

from __future__ import annotations

import concurrent.futures
import os
import pathlib
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

ray = pytest.importorskip("ray")

from ray.cluster_utils import Cluster  # noqa: E402
from ray.exceptions import RayError  # noqa: E402

import dormant  # noqa: E402
from dormant.ray import CodeResult, SandboxHandle, SandboxPool, actor_name  # noqa: E402
from seaweed import SeaweedFS  # noqa: E402

MB = 1024 * 1024
# Credentials the usual way, for the workers too (they inherit the nodes' environment);
# SeaweedFS without an IAM configuration accepts any.
CREDS = {"AWS_ACCESS_KEY_ID": "dormant-test", "AWS_SECRET_ACCESS_KEY": "dormant-test-secret"}
HELLO_WASM = (pathlib.Path(__file__).parent / "data" / "hello.wasm").read_bytes()


@dataclass
class RayCluster:
    cluster: Cluster
    node1: str
    node2: str
    seaweed: SeaweedFS
    cache: pathlib.Path

    def pool(self) -> SandboxPool:
        """A pool of a new prefix of the bucket."""
        return self.pool_at(self.seaweed.url(f"ray-{uuid.uuid4().hex[:12]}"))

    def pool_at(self, url: str, namespace: str = "dormant") -> SandboxPool:
        return SandboxPool(
            url,
            endpoint_url=self.seaweed.endpoint,
            cache_dir=self.cache,
            lease_ttl=10,
            namespace=namespace,
        )


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayCluster]:
    weed = SeaweedFS(tmp_path_factory.mktemp("seaweedfs"))
    saved = {k: os.environ.get(k) for k in [*CREDS, "RAY_USAGE_STATS_ENABLED"]}
    # Before the nodes start: their workers inherit this environment.
    os.environ.update(CREDS)
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    # Two small nodes: one CPU each (an actor asks for 0.1), a small object store.
    c = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 1,
            "object_store_memory": 200 * MB,
            "include_dashboard": False,
        },
    )
    try:
        second = c.add_node(num_cpus=1, object_store_memory=200 * MB)
        c.wait_for_nodes(timeout=120)
        ray.init(address=c.address, namespace="dormant-test")
        assert c.head_node is not None
        node1, node2 = str(c.head_node.node_id), str(second.node_id)
        assert node1 != node2
        alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
        assert {node1, node2} <= alive, alive
        yield RayCluster(c, node1, node2, weed, tmp_path_factory.mktemp("ray-cache"))
    finally:
        ray.shutdown()
        c.shutdown()  # type: ignore[no-untyped-call]
        weed.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def actor_node(handle: SandboxHandle) -> str:
    """The node id the actor itself reports."""
    node: str = ray.get(getattr(handle.actor, "node_id").remote())
    return node


def wait_name_free(name: str, namespace: str, within: float = 60) -> None:
    deadline = time.monotonic() + within
    while True:
        try:
            ray.get_actor(name, namespace=namespace)
        except ValueError:
            return
        assert time.monotonic() < deadline, f"actor {name} still there after {within} s"
        time.sleep(0.05)


@pytest.mark.timeout(900)
def test_a_session_moves_to_another_node_with_its_state(cluster: RayCluster) -> None:
    pool = cluster.pool()
    t0 = time.monotonic()
    sb = pool.create("wasi", node_id=cluster.node1)
    created = time.monotonic() - t0
    assert sb.node_id == cluster.node1 and actor_node(sb) == cluster.node1
    r = sb.run_code("import pandas as pd\nx = 41\ndf = pd.DataFrame({'a': [1, 2, 3]})\nx")
    assert isinstance(r, CodeResult)
    assert r.error is None and r.results == ["41"], r
    sb.write_file("/data/notes.txt", "from node 1")
    sb.write_file("/bin/hello.wasm", HELLO_WASM)
    out = sb.exec("/bin/hello.wasm")
    assert (out.stdout, out.stderr, out.exit_code) == ("hello from wasi\n", "oops\n", 3)
    failed = sb.run_code("1 / 0")
    assert failed.error is not None and failed.error.name == "ZeroDivisionError"
    with pytest.raises(FileNotFoundError):
        sb.read_file("/data/missing.txt")

    snap = sb.standby()  # durable: in the bucket, the lease released, the actor ending
    assert snap
    assert pool.sandboxes() == {}
    with pytest.raises(dormant.InvalidState):
        sb.run_code("print(x)")  # its actor has ended (or is ending)
    t0 = time.monotonic()
    moved = pool.get(sb.sandbox_id, node_id=cluster.node2)
    resumed = time.monotonic() - t0
    assert moved.sandbox_id == sb.sandbox_id
    assert moved.node_id == cluster.node2
    assert actor_node(moved) == cluster.node2
    assert moved.run_code("print(x + 1, df['a'].sum())").stdout == "42 6\n"
    assert moved.read_file("/data/notes.txt") == b"from node 1"
    # Node 2 cached the snapshot in a directory of its own.
    assert (cluster.cache / cluster.node2).is_dir() and (cluster.cache / cluster.node1).is_dir()
    moved.standby()
    print(f"create on node 1: {created:.2f} s; resume on node 2: {resumed:.2f} s")


@pytest.mark.timeout(900)
def test_get_routes_to_the_live_actor(cluster: RayCluster) -> None:
    pool = cluster.pool()
    sb = pool.create("wasi", node_id=cluster.node2)
    sb.run_code("y = 'never checkpointed'")
    again = pool.get(sb.sandbox_id)
    assert again.actor_id == sb.actor_id and again.node_id == cluster.node2
    # Not resumed from the bucket: the uncheckpointed variable is there.
    assert again.run_code("print(y)").stdout == "never checkpointed\n"

    # A resumed sandbox's actor is named: a pool of the same namespace routes to it, wherever
    # it runs (node_id only places a new actor).
    sb.checkpoint(durable=True)
    assert sb.standby(durable=True)
    held = pool.get(sb.sandbox_id, node_id=cluster.node1)
    assert held.node_id == cluster.node1
    held.run_code("z = 'live on node 1'")
    other = cluster.pool_at(pool.store.url)
    routed = other.get(sb.sandbox_id, node_id=cluster.node2)
    assert routed.actor_id == held.actor_id and routed.node_id == cluster.node1
    assert routed.run_code("print(z)").stdout == "live on node 1\n"
    assert other.standby(sb.sandbox_id) is not None
    assert not held.alive()
    assert pool.standby(sb.sandbox_id) is None  # nothing live holds it now
    wait_name_free(actor_name(sb.sandbox_id), pool.namespace)


@pytest.mark.timeout(900)
def test_pools_that_get_one_sandbox_at_once_share_one_actor(cluster: RayCluster) -> None:
    pool = cluster.pool()
    sb = pool.create("wasi")
    sb.run_code("n = 7")
    sb.standby()
    pools = [cluster.pool_at(pool.store.url) for _ in range(4)]
    with concurrent.futures.ThreadPoolExecutor(len(pools)) as ex:
        handles = list(ex.map(lambda p: p.get(sb.sandbox_id), pools))
    assert len({h.actor_id for h in handles}) == 1, "one actor holds the sandbox"
    assert handles[0].run_code("print(n)").stdout == "7\n"
    assert pools[1].standby(sb.sandbox_id) is not None
    wait_name_free(actor_name(sb.sandbox_id), pool.namespace)


@pytest.mark.timeout(900)
def test_a_sandbox_held_by_a_live_actor_cannot_be_resumed_elsewhere(
    cluster: RayCluster, tmp_path: pathlib.Path
) -> None:
    pool = cluster.pool()
    sb = pool.create("wasi", node_id=cluster.node1)
    sb.run_code("x = 1")
    sb.checkpoint(durable=True)

    # Another pool: the created sandbox's actor is unnamed, so it cannot route to it, and its
    # resume on node 2 meets the lease.
    other = cluster.pool_at(pool.store.url)
    with pytest.raises(dormant.SandboxBusy) as e:
        other.get(sb.sandbox_id, node_id=cluster.node2)
    assert not isinstance(e.value, RayError), "the dormant exception, not Ray's wrapper"
    assert "running on another host" in str(e.value)
    wait_name_free(actor_name(sb.sandbox_id), other.namespace)  # the failed actor is gone
    # A host outside Ray too.
    store = dormant.Store(
        pool.store.url, endpoint_url=cluster.seaweed.endpoint, cache_dir=tmp_path / "driver"
    )
    with pytest.raises(dormant.SandboxBusy):
        dormant.Sandbox.connect(sb.sandbox_id, store=store)
    # Once resumed (a named actor), a pool of another namespace meets the lease as well.
    sb.standby()
    named = pool.get(sb.sandbox_id, node_id=cluster.node2)
    elsewhere = cluster.pool_at(pool.store.url, namespace="dormant-test-elsewhere")
    with pytest.raises(dormant.SandboxBusy):
        elsewhere.get(sb.sandbox_id, node_id=cluster.node1)
    assert named.run_code("print(x)").stdout == "1\n", "the holder was not disturbed"
    # After its standby, any of them resumes it.
    named.standby()
    taken = elsewhere.get(sb.sandbox_id, node_id=cluster.node1)
    assert taken.run_code("print(x)").stdout == "1\n"
    with pytest.raises(dormant.SandboxTimeout):
        taken.run_code("while True: pass", timeout=1)
    taken.kill()
    with pytest.raises(dormant.InvalidState):
        taken.run_code("print(x)")


def test_importing_dormant_does_not_import_ray() -> None:
    code = "import sys, dormant; assert 'ray' not in sys.modules, 'ray was imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_dormant_ray_without_ray_says_how_to_install_it() -> None:
    code = (
        "import sys\n"
        "sys.modules['ray'] = None  # as if Ray were not installed\n"
        "try:\n"
        "    import dormant.ray\n"
        "except ImportError as e:\n"
        "    print(e)\n"
    )
    p = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert 'pip install "dormant[ray]"' in p.stdout, p.stdout + p.stderr
