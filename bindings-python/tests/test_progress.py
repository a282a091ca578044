"""``progress=`` on ``Template.build`` (WASI tier): one event per step, ``done`` increasing,
a final event last; an up-to-date build reports only the final event; a callback's exception
is raised."""

from __future__ import annotations

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
