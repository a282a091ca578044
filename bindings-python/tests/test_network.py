"""Network policies: ``dormant.NetworkPolicy``, ``network=`` of ``Sandbox.create`` and
``Template``, ``sb.set_network`` and ``sb.network``; and end to end on the ``coding`` image, a
guest fetching from an HTTP server of the test on the host's 127.0.0.1 (curl, git clone) only
while its policy allows ``host``. The WASI tier has no sockets; the KVM tests skip, with the
reason shown, only where this host has no usable /dev/kvm (the end-to-end test also where the
coding image is not built and cannot be)."""

from __future__ import annotations

import functools
import http.server
import os
import pathlib
import shutil
import subprocess
import threading
from collections.abc import Iterator

import pytest

import dormant
from dormant import NetworkPolicy

from conftest import KVM_OK, KVM_WHY

# Generous: guest kernel code is emulated on PVM hosts, and the first create of the coding
# image boots it.
CODING_TIMEOUT = 900


def test_policy_entries_are_checked_and_kept_canonical() -> None:
    p = NetworkPolicy(
        allow=["PyPI.org.", "*.GitHub.com", "10.1.2.3/8", "HOST", "pypi.org", "::1"],
        deny=["evil.github.com", "10.9.0.0/16"],
    )
    assert p.allow == ("pypi.org", "*.github.com", "10.0.0.0/8", "host", "::1")
    assert p.deny == ("evil.github.com", "10.9.0.0/16")
    assert not p.is_off and NetworkPolicy().is_off
    assert p == NetworkPolicy(allow=list(p.allow), deny=list(p.deny))
    assert hash(p) == hash(NetworkPolicy(allow=list(p.allow), deny=list(p.deny)))
    assert p != NetworkPolicy.open() and NetworkPolicy.open().allow == ("*",)
    assert eval(repr(p), {"NetworkPolicy": NetworkPolicy}) == p
    # host.dormant.internal is the host entry by its other name.
    assert NetworkPolicy(allow=["host.dormant.internal"]).allow == ("host",)

    for bad in ["", "a b.com", "x*.com", "10.0.0.0/33", "a..b", "*."]:
        with pytest.raises(dormant.InvalidArgument, match="entry"):
            NetworkPolicy(allow=[bad])
        with pytest.raises(dormant.InvalidArgument, match="entry"):
            NetworkPolicy(deny=[bad])
    with pytest.raises(dormant.InvalidArgument, match="at most 256|more than 256"):
        NetworkPolicy(allow=[f"h{i}.com" for i in range(257)])
    with pytest.raises(TypeError, match="list of str"):
        NetworkPolicy(allow="pypi.org")
    with pytest.raises(TypeError, match="entries must be str"):
        NetworkPolicy(allow=[b"pypi.org"])  # type: ignore[list-item]


def test_network_takes_none_open_or_a_policy(store: pathlib.Path) -> None:
    with pytest.raises(dormant.InvalidArgument, match='"open"'):
        dormant.Sandbox.create(store=store, network="closed")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="NetworkPolicy"):
        dormant.Sandbox.create(store=store, network=["*"])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="NetworkPolicy"):
        dormant.Template("t", image="minimal", network=1)  # type: ignore[arg-type]


def test_the_wasi_tier_has_no_network(store: pathlib.Path) -> None:
    for network in ("open", NetworkPolicy(allow=["host"])):
        with pytest.raises(dormant.Unsupported, match="no sockets"):
            dormant.Sandbox.create(store=store, network=network)
    with pytest.raises(dormant.Unsupported, match="no sockets"):
        dormant.Template("no-net", network="open").build(store)
    # Off is fine, and the same as none.
    sb = dormant.Sandbox.create(store=store, network=None, idle_standby=None)
    with pytest.raises(dormant.Unsupported, match="no sockets"):
        sb.set_network("open")
    with pytest.raises(dormant.Unsupported, match="no sockets"):
        _ = sb.network
    assert sb.run_code("print(1 + 1)").stdout == "2\n"
    sb.kill()


@pytest.mark.timeout(1800)
def test_the_policy_is_set_while_running_and_kept_by_snapshots_and_templates(
    kvm_store: pathlib.Path,
) -> None:
    host = NetworkPolicy(allow=["host", "pypi.org"], deny=["10.0.0.0/8"])
    sb = dormant.Sandbox.create(
        image="minimal",
        store=kvm_store,
        memory_mib=128,
        timeout=300,
        idle_standby=None,
        network=host,
    )
    assert sb.network == host
    sb.set_network("open")
    assert sb.network == NetworkPolicy.open()

    # Standby records it; reading it does not wake the sandbox; a resume starts under it.
    snap = sb.standby()
    assert sb.network == NetworkPolicy.open() and sb.state == "standby"
    again = dormant.Sandbox.resume(snap, store=kvm_store, idle_standby=None)
    assert again.network == NetworkPolicy.open()
    # Setting it wakes a sleeping sandbox; None turns it off.
    sb.set_network(None)
    assert sb.state == "running" and sb.network == NetworkPolicy()
    assert again.network == NetworkPolicy.open(), "each sandbox has its own"
    [child] = again.fork(1)
    assert child.network == NetworkPolicy.open()
    for s in (sb, again, child):
        s.kill()

    # A template's policy is its sandboxes'; network= at create replaces it.
    tpl = dormant.Template("with-net", image="minimal", memory_mib=128, network=host)
    tpl.build(kvm_store)
    from_tpl = dormant.Sandbox.create(template="with-net", store=kvm_store, idle_standby=None)
    assert from_tpl.network == host
    from_tpl.kill()
    other = dormant.Sandbox.create(
        template="with-net", store=kvm_store, idle_standby=None, network="open"
    )
    assert other.network == NetworkPolicy.open()
    other.kill()


def _git(*args: str, cwd: pathlib.Path) -> None:
    env = dict(os.environ, GIT_AUTHOR_NAME="host", GIT_AUTHOR_EMAIL="host@example.com",
               GIT_COMMITTER_NAME="host", GIT_COMMITTER_EMAIL="host@example.com")
    subprocess.run(["git", *args], cwd=cwd, env=env, check=True, capture_output=True)


@pytest.fixture
def host_server(tmp_path: pathlib.Path) -> Iterator[int]:
    """An HTTP server on the host's 127.0.0.1 (a free port, given) serving a file and a git
    repository over dumb HTTP (a bare repository with `git update-server-info`)."""
    if shutil.which("git") is None:
        pytest.skip("SKIPPED: the host has no git to make the repository with")
    www = tmp_path / "www"
    www.mkdir()
    (www / "file.txt").write_text("served by the host\n")
    work = tmp_path / "work"
    work.mkdir()
    (work / "README.md").write_text("# over http\n")
    _git("init", "-q", "-b", "main", cwd=work)
    _git("add", "README.md", cwd=work)
    _git("commit", "-q", "-m", "initial import", cwd=work)
    _git("clone", "-q", "--bare", str(work), str(www / "repo.git"), cwd=tmp_path)
    _git("update-server-info", cwd=www / "repo.git")

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Quiet, directory=str(www))
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.skipif(not KVM_OK, reason=f"SKIPPED: the KVM tier cannot run here: {KVM_WHY}")
@pytest.mark.timeout(2400)
def test_the_guest_reaches_the_host_only_while_the_policy_allows_it(
    tmp_path: pathlib.Path, host_server: int
) -> None:
    if os.geteuid() != 0 and not any(i.name == "coding" for i in dormant.list_images()):
        pytest.skip("SKIPPED: the coding image is not built and building it needs root")
    port = host_server
    url = f"http://host.dormant.internal:{port}"
    sb = dormant.Sandbox.create(
        image="coding",
        store=tmp_path / "store",
        memory_mib=512,
        timeout=CODING_TIMEOUT,
        idle_standby=None,
        network=NetworkPolicy(allow=["host"]),
    )

    def run(cmd: str) -> dormant.CommandResult:
        r = sb.commands.run(cmd, timeout=CODING_TIMEOUT)
        assert isinstance(r, dormant.CommandResult)
        return r

    def ok(cmd: str) -> str:
        r = run(cmd)
        assert r.exit_code == 0, f"{cmd}: exit {r.exit_code}\n{r.stdout}\n{r.stderr}"
        return r.stdout

    # Allowed: the host's loopback by its name, with curl and git (dumb HTTP).
    assert ok("getent hosts host.dormant.internal").split()[0] == "10.0.2.2"
    assert ok(f"curl -sSf --max-time 60 {url}/file.txt") == "served by the host\n"
    ok(f"git clone -q {url}/repo.git /root/clone")
    assert ok("git -C /root/clone log --format=%s") == "initial import\n"
    # Names the policy does not allow do not resolve.
    for name in ("example.invalid", "pypi.org"):
        r = run(f"getent hosts {name}")
        assert r.exit_code != 0, f"{name} resolved: {r.stdout}"

    def refused(what: str) -> None:
        """The fetch fails with a connection error (curl 6: the name does not resolve; 7: the
        connection is refused) well within curl's 5 s limit (28 would be that limit)."""
        for target in (f"{url}/file.txt", f"http://10.0.2.2:{port}/file.txt"):
            r = run(f"curl -sS --max-time 5 -o /dev/null {target}")
            assert r.exit_code in (6, 7), f"{what}: {target}: exit {r.exit_code}: {r.stderr}"

    # A policy without "host", set while the sandbox runs, and the default (off).
    sb.set_network(NetworkPolicy(allow=["pypi.org"]))
    refused('allow=["pypi.org"]')
    sb.set_network(None)
    refused("the default policy")
    r = run("getent hosts host.dormant.internal")
    assert r.exit_code != 0, r.stdout
    # Back on: it works again, in the same running sandbox.
    sb.set_network(NetworkPolicy(allow=["host"]))
    assert ok(f"curl -sSf --max-time 60 {url}/file.txt") == "served by the host\n"
    sb.kill()
