"""The smolagents adapter (dormant.smolagents.DormantExecutor), driven the way smolagents'
CodeAgent drives a remote executor: send_variables, send_tools (with the real FinalAnswerTool,
patched by smolagents), then code actions. No model and no network: the code actions are the
ones an LLM would write. Persistence: state made in one run is there after standby and a resume
through a new executor."""

from __future__ import annotations

import pathlib

import pytest
from smolagents import Tool  # type: ignore[import-untyped]
from smolagents.default_tools import FinalAnswerTool  # type: ignore[import-untyped]
from smolagents.utils import AgentError  # type: ignore[import-untyped]

import dormant
from dormant.smolagents import DormantExecutor

pytestmark = pytest.mark.timeout(300)


class Doubler(Tool):  # type: ignore[misc]  # smolagents is untyped
    name = "double"
    description = "Doubles a number."
    inputs = {"x": {"type": "integer", "description": "the number"}}
    output_type = "integer"

    def forward(self, x: int) -> int:
        return 2 * x


def test_runs_persist_across_standby_and_resume(store: pathlib.Path) -> None:
    ex = DormantExecutor(store=store)
    ex.send_variables({"rows": [3, 1, 2], "label": "sales"})
    ex.send_tools({"double": Doubler(), "final_answer": FinalAnswerTool()})

    out = ex("import statistics\ntotal = sum(rows)\nprint('total', total)\ndouble(total)")
    assert out.logs == "total 6\n"
    assert out.output == 12
    assert out.is_final_answer is False

    # A statement as the last line: no output value; a non-JSON value: its repr.
    assert ex("y = 1").output is None
    assert ex("{1, 2}").output == "{1, 2}"
    # The final expression is not echoed into the logs.
    assert ex("print('a'); 'b'").logs == "a\n"

    ex.sandbox.files.write("/data/notes.txt", "first run")
    snap = ex.standby()
    assert ex.snapshot_id == snap

    # The next agent run: a new executor resumes the snapshot; nothing is re-sent.
    ex2 = DormantExecutor(snapshot_id=snap, store=store)
    out = ex2("print(label, total, statistics.mean(rows))\ndouble(total) + 1")
    assert out.logs == "sales 6 2\n"
    assert out.output == 13
    assert ex2("open('/data/notes.txt').read()").output == "first run"

    final = ex2("final_answer({'total': total, 'label': label})")
    assert final.is_final_answer is True
    assert final.output == {"total": 6, "label": "sales"}
    ex2.delete()
    ex.delete()


def test_errors_reach_smolagents_as_agent_errors(store: pathlib.Path) -> None:
    ex = DormantExecutor(store=store)
    with pytest.raises(AgentError) as info:
        ex("x = 1\n\n1 / 0")
    assert "ZeroDivisionError" in str(info.value)
    # The traceback points at the agent's own line (the final-expression capture keeps lines).
    assert "line 3" in str(info.value)
    with pytest.raises(AgentError, match="SyntaxError"):
        ex("def f(:")
    # The session goes on after an error.
    assert ex("x + 1").output == 2

    # Packages: the compiled-in ones pass, others are refused with their names.
    assert ex.install_packages(["numpy", "pandas"]) == ["numpy", "pandas"]
    with pytest.raises(AgentError, match="no_such_pkg_for_dormant"):
        ex.install_packages(["no_such_pkg_for_dormant"])

    with pytest.raises(dormant.InvalidArgument):
        DormantExecutor(snapshot_id="x", template="y", store=store)
    ex.delete()


def test_sandbox_failures_are_agent_errors(store: pathlib.Path) -> None:
    ex = DormantExecutor(store=store, timeout=5.0)
    ex("kept = 'before the checkpoint'")
    snap = ex.checkpoint()
    ex("lost = 'after it'")
    with pytest.raises(AgentError, match="SandboxTimeout") as info:
        ex("while True:\n    pass")
    assert snap in str(info.value)
    # The session went back to the checkpoint and goes on.
    assert ex("kept").output == "before the checkpoint"
    assert ex("'lost' in globals()").output is False
    ex.delete()
