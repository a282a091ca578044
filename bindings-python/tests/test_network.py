"""Network policies: ``dormant.NetworkPolicy``, ``network=`` of ``Sandbox.create`` and
``Template``, ``sb.set_network`` and ``sb.network``. The WASI tier has no sockets; the KVM tests
skip, with the reason shown, only where this host has no usable /dev/kvm."""

from __future__ import annotations

import pathlib

import pytest

import dormant
from dormant import NetworkPolicy


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
