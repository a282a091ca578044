"""Templates from Python on the WASI tier: built once, sandboxes created from them, failing
steps, listing; and what ``Sandbox.create`` refuses around ``template=`` and ``image=``."""

from __future__ import annotations

import pathlib

import pytest

import dormant


def sales(**kw: object) -> dormant.Template:
    return dormant.Template(
        "sales",
        files={"/data/sales.csv": b"day,amount\n1,10\n2,32\n", "/data/note.txt": "from str"},
        run=[
            "rows = open('/data/sales.csv').read().splitlines()[1:]",
            "total = sum(int(r.split(',')[1]) for r in rows)",
        ],
        **kw,  # type: ignore[arg-type]
    )


def test_a_template_is_built_once_and_its_sandboxes_are_independent(store: pathlib.Path) -> None:
    tpl = sales()
    assert tpl.tier == "wasi" and tpl.snapshot_id is None and tpl.built is None
    first = tpl.build(store=store)
    assert first.startswith("s-") and tpl.snapshot_id == first and tpl.built is True
    again = sales()
    assert again.build(store=store) == first
    assert again.built is False

    a = dormant.Sandbox.create(template="sales", store=store, idle_standby=None)
    b = dormant.Sandbox.create(template="sales", store=store, idle_standby=None)
    assert a.tier == b.tier == "wasi"
    assert a.id != b.id
    assert a.run_code("total").stdout == "42\n"
    assert a.files.read_text("/data/note.txt") == "from str"
    a.run_code("total = -1")
    assert b.run_code("total").stdout == "42\n"
    assert a.run_code("total").stdout == "-1\n"

    [info] = dormant.list_templates(store)
    assert (info.name, info.tier, info.snapshot_id) == ("sales", "wasi", first)
    assert info.created.tzinfo is not None

    # A changed recipe builds again.
    assert sales(env={"MODE": "x"}).build(store=store) != first
    assert dormant.list_templates(store)[0].snapshot_id != first


def test_a_failing_step_raises_with_the_step_and_records_nothing(store: pathlib.Path) -> None:
    tpl = dormant.Template("broken", run=["x = 1", "print('partial'); 1 / 0"])
    with pytest.raises(dormant.TemplateBuildError) as e:
        tpl.build(store=store)
    msg = str(e.value)
    assert "run[1]" in msg and "1 / 0" in msg and "ZeroDivisionError" in msg, msg
    assert "partial" in msg, msg
    assert isinstance(e.value, dormant.SandboxError)
    assert tpl.snapshot_id is None
    assert dormant.list_templates(store) == []
    with pytest.raises(dormant.InvalidArgument, match="no template named"):
        dormant.Sandbox.create(template="broken", store=store)


def test_what_create_and_template_refuse(store: pathlib.Path) -> None:
    sales().build(store=store)
    with pytest.raises(dormant.InvalidArgument, match="wasi tier, not kvm"):
        dormant.Sandbox.create("kvm", template="sales", store=store)
    with pytest.raises(dormant.InvalidArgument, match="memory_mib"):
        dormant.Sandbox.create(template="sales", store=store, memory_mib=64)
    with pytest.raises(dormant.InvalidArgument, match="tier='kvm'"):
        dormant.Sandbox.create("wasi", image="minimal", store=store)
    with pytest.raises(dormant.InvalidArgument, match="template name"):
        dormant.Template("no/slashes").build(store=store)
    with pytest.raises(dormant.Unsupported):
        dormant.Template("srv", tier="wasi", start="serve", ready_port=80).build(store=store)
    with pytest.raises(TypeError):
        dormant.Template("t", run="x = 1")
    with pytest.raises(dormant.InvalidArgument):
        dormant.Template("t", ready_port=8000, ready_cmd="true")
    assert dormant.Template("k", image="minimal").tier == "kvm"
    # With no arguments, still a WASI Python session.
    sb = dormant.Sandbox.create(store=store, idle_standby=None)
    assert sb.tier == "wasi" and sb.run_code("1 + 1").stdout == "2\n"
