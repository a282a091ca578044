"""``progress=`` on ``Template.build`` (WASI tier): one event per step, ``done`` increasing,
a final event last; an up-to-date build reports only the final event; a callback's exception
is raised. ``Sandbox.create(progress=)`` on the WASI tier reports its final event;
``build_image(progress=)`` (a small root filesystem directory; needs root) its stages. The KVM
tier's boot events are checked in kvm-tier/tests/linux.rs (a base's first boot)."""

from __future__ import annotations

import os
import pathlib

import pytest

import dormant


def test_a_template_build_reports_its_steps_and_a_final_event(store: pathlib.Path) -> None:
    events: list[dormant.ProgressEvent] = []
    tpl = dormant.Template("prog", files={"/data/a.txt": "a"}, run=["x = 1", "y = x + 1"])
    tpl.build(store=store, progress=events.append)
    assert [e.stage for e in events] == [
        "create the wasi sandbox",
        "write /data/a.txt",
        "run step 1: x = 1",
        "run step 2: y = x + 1",
        "checkpoint",
        "built",
    ]
    assert [e.done for e in events] == [0, 1, 2, 3, 4, 5]
    assert all(e.total == 5 and e.unit == "steps" for e in events)
    assert [e.finished for e in events] == [False] * 5 + [True]

    again: list[dormant.ProgressEvent] = []
    dormant.Template("prog", files={"/data/a.txt": "a"}, run=["x = 1", "y = x + 1"]).build(
        store=store, progress=again.append
    )
    assert again == [dormant.ProgressEvent("up to date", 5, 5, "steps", True)]


def test_a_callbacks_exception_is_raised(store: pathlib.Path) -> None:
    def boom(e: dormant.ProgressEvent) -> None:
        raise ValueError("from the callback")

    with pytest.raises(ValueError, match="from the callback"):
        dormant.Template("boom", run=["x = 1"]).build(store=store, progress=boom)
    with pytest.raises(TypeError):
        dormant.Template("bad", run=["x = 1"]).build(store=store, progress=3)  # type: ignore[arg-type]


def test_a_wasi_create_reports_its_final_event(store: pathlib.Path) -> None:
    events: list[dormant.ProgressEvent] = []
    sb = dormant.Sandbox.create(store=store, progress=events.append)
    try:
        assert sb.run_code("print(1 + 1)").stdout == "2\n"
    finally:
        sb.kill()
    assert events == [dormant.ProgressEvent("sandbox ready", 1, 1, "steps", True)]

    def boom(e: dormant.ProgressEvent) -> None:
        raise ValueError("from the create's callback")

    with pytest.raises(ValueError, match="from the create's callback"):
        dormant.Sandbox.create(store=store, progress=boom)
    with pytest.raises(TypeError):
        dormant.Sandbox.create(store=store, progress=3)  # type: ignore[arg-type]


@pytest.mark.skipif(os.geteuid() != 0, reason="building an image needs root")
def test_an_image_build_reports_its_stages_and_a_cached_one_its_end(
    tmp_path: pathlib.Path,
) -> None:
    # A new directory (its files' times are part of the recipe): the first build makes it.
    tree = tmp_path / "rootfs"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc" / "motd").write_text("progress\n")
    name = "dormant-test-py-progress"
    events: list[dormant.ProgressEvent] = []
    info = dormant.build_image(name, rootfs=tree, progress=events.append)
    assert pathlib.Path(info.path).is_file()
    # A tool's output lines come as "STAGE — LINE", with the stage's step.
    steps = [(e.stage, e.done, e.finished) for e in events if " — " not in e.stage]
    # A stage is cut to 100 characters, with "…".
    first = f"image {name}: root filesystem from {tree}"
    first = first if len(first) <= 100 else first[:100] + "…"
    assert steps == [
        (first, 0, False),
        (f"image {name}: ext4 filesystem", 1, False),
        (f"image {name} built", 2, False),
        (f"image {name} ready", 3, True),
    ]
    assert all(e.total == 3 and e.unit == "steps" for e in events)

    again: list[dormant.ProgressEvent] = []
    assert dormant.build_image(name, rootfs=tree, progress=again.append) == info
    assert again == [dormant.ProgressEvent(f"image {name} ready (cached)", 3, 3, "steps", True)]
