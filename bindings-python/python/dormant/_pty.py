"""Terminals: ``sb.pty``, a program on a pseudo-terminal in a Linux microVM (KVM tier)."""

from __future__ import annotations

import shlex
import threading
from collections.abc import Callable, Sequence

from . import _native
from ._errors import InvalidArgument, SandboxTimeout

DataCallback = Callable[[bytes], object]

#: Largest terminal width or height, in character cells.
MAX_TERMINAL_CELLS = 4096

#: Bytes the reader thread asks for at a time.
_READ_CHUNK = 64 * 1024
#: How long ``wait`` gives the last output to reach ``on_data`` once the program ended (a
#: background child still holding the terminal keeps the attachment open).
_OUTPUT_GRACE = 5.0


def _cells(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    if not 1 <= value <= MAX_TERMINAL_CELLS:
        raise InvalidArgument(
            f"{name} must be from 1 to {MAX_TERMINAL_CELLS} character cells, not {value}"
        )
    return value


def _pid(pid: int) -> int:
    if isinstance(pid, bool) or not isinstance(pid, int):
        raise TypeError(f"pid must be an int, not {type(pid).__name__}")
    if not 1 <= pid < 2**32:
        raise InvalidArgument(f"no terminal {pid} (a pid is a positive int)")
    return pid


def _callback(on_data: DataCallback | None) -> DataCallback | None:
    if on_data is not None and not callable(on_data):
        raise TypeError("on_data must be callable")
    return on_data


class Pty:
    """An attached terminal: ``write`` types into it, ``resize`` changes its size, ``kill``
    ends its program; its output goes to ``on_data`` (raw bytes, escape sequences included)
    from a background thread as it comes.

    The program lives in the sandbox and survives standby and resume; this attachment does not:
    it ends when the sandbox goes to standby (then :attr:`connected` is false and ``write``
    raises :class:`OSError`). ``sb.pty.connect(pid, on_data=...)`` attaches again (the output
    produced meanwhile, its newest 64 KiB, comes first)."""

    def __init__(
        self, native: _native.NativeSandbox, pid: int, on_data: DataCallback | None
    ) -> None:
        self._native = native
        self.pid = pid
        """The program's pid in the guest (also its session and process-group id)."""
        self._on_data = on_data
        self._failed: BaseException | None = None
        self._term = native.pty_attach(pid)
        self._ended = threading.Event()
        self._reader = threading.Thread(
            target=self._read_loop, name=f"dormant-pty-{pid}", daemon=True
        )
        self._reader.start()

    def _read_loop(self) -> None:
        try:
            while True:
                data = self._term.read(_READ_CHUNK)
                if not data:
                    return
                if self._on_data is not None:
                    try:
                        self._on_data(data)
                    except BaseException as e:  # kept for wait()/disconnect() to raise
                        if self._failed is None:
                            self._failed = e
        finally:
            self._ended.set()

    def _raise_failed(self) -> None:
        failed, self._failed = self._failed, None
        if failed is not None:
            raise failed

    @property
    def connected(self) -> bool:
        """Whether output still flows to ``on_data`` (false once the program ended, the
        attachment was closed or taken over, or the sandbox went to standby)."""
        return not self._ended.is_set()

    def write(self, data: bytes | str) -> None:
        """Types ``data`` into the terminal (a ``str`` is sent as UTF-8). Raises
        :class:`OSError` once the attachment has ended."""
        if isinstance(data, str):
            data = data.encode()
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"data must be bytes or str, not {type(data).__name__}")
        self._term.write(bytes(data))

    def resize(self, cols: int, rows: int) -> None:
        """Sets the terminal's size in character cells (1 to 4096 each); the program gets
        ``SIGWINCH`` and full-screen programs redraw."""
        self._native.pty_resize(self.pid, _cells("cols", cols), _cells("rows", rows))

    def kill(self) -> None:
        """Sends SIGKILL to the program's process group; the attachment then ends."""
        self._native.signal(self.pid, 9)

    def wait(self, timeout: float | None = None) -> int:
        """Waits for the program to end (``timeout`` seconds at most, else
        :class:`SandboxTimeout`) and returns its exit code (128 + signal number when a signal
        ended it), once ``on_data`` has had its last output (a few seconds at most: a
        background child still holding the terminal keeps it open). Re-raises the first
        exception ``on_data`` raised."""
        if timeout is not None and (
            isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout < 0
        ):
            raise InvalidArgument(f"timeout must be a non-negative number of seconds: {timeout}")
        code = self._native.wait(self.pid, None if timeout is None else float(timeout))
        if code is None:
            raise SandboxTimeout(f"terminal {self.pid} still runs after {timeout} s")
        self._ended.wait(_OUTPUT_GRACE)
        self._raise_failed()
        return code

    def disconnect(self) -> None:
        """Detaches (the program runs on; ``connect`` attaches again) once the output that
        arrived has gone to ``on_data``. Re-raises the first exception ``on_data`` raised."""
        self._term.close()
        self._ended.wait()
        self._raise_failed()

    def __repr__(self) -> str:
        return f"<dormant.Pty pid={self.pid} connected={self.connected}>"


class Ptys:
    """``sb.pty``: programs on pseudo-terminals (KVM tier; the WASI tier raises
    :class:`Unsupported`)."""

    def __init__(self, native: _native.NativeSandbox) -> None:
        self._native = native

    def create(
        self,
        cmd: str | Sequence[str] | None = None,
        *,
        cols: int = 80,
        rows: int = 24,
        on_data: DataCallback | None = None,
    ) -> Pty:
        """Starts ``cmd`` on a new terminal of ``cols`` x ``rows`` character cells (1 to
        4096 each) and attaches to it. ``cmd``: ``None`` is the image's shell (``bash`` where
        it has one, else ``sh``); a string is split into arguments (``"bash"``,
        ``"python3 -q"``); a list is the argv. The program runs with ``TERM=xterm-256color``
        in ``/root``, in a session of its own. ``on_data`` receives the output (bytes) from a
        background thread. A sleeping sandbox is woken for it."""
        if cmd is None:
            argv: list[str] = []
        elif isinstance(cmd, str):
            argv = shlex.split(cmd)
            if not argv:
                raise InvalidArgument("cmd is empty (None runs the image's shell)")
        elif isinstance(cmd, Sequence) and all(isinstance(a, str) for a in cmd):
            argv = list(cmd)
            if not argv or not argv[0]:
                raise InvalidArgument("cmd is empty (None runs the image's shell)")
        else:
            raise TypeError("cmd must be None, a str or a sequence of str")
        callback = _callback(on_data)
        pid = self._native.pty_open(argv, _cells("cols", cols), _cells("rows", rows))
        return Pty(self._native, pid, callback)

    def connect(self, pid: int, *, on_data: DataCallback | None = None) -> Pty:
        """Attaches to the terminal ``pid`` (from :meth:`create`, in this process or another,
        before or after standby and resume): the output it produced while nobody was attached
        (the newest 64 KiB) comes first. One attachment per terminal at a time: this one ends
        the previous. An unknown pid raises :class:`InvalidArgument`."""
        return Pty(self._native, _pid(pid), _callback(on_data))
