"""Terminals (``sb.pty``) on the KVM tier: a real pseudo-terminal in the guest, resized, typed
into, kept across standby and resume, reattached. One sandbox (the busybox ``minimal`` image)
for the KVM test. Skipped, with the reason shown, only where this host has no usable /dev/kvm."""

from __future__ import annotations

import pathlib
import threading
import time
from collections.abc import Callable

import pytest

import dormant

#: Generous: guest kernel code may be emulated (PVM hosts) on a busy machine.
PATIENCE = 180.0


class Screen:
    """What a terminal sent to ``on_data``, with a wait for text to appear."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.threads: set[str] = set()
        self.cv = threading.Condition()

    def add(self, chunk: bytes) -> None:
        assert isinstance(chunk, bytes)
        with self.cv:
            self.data += chunk
            self.threads.add(threading.current_thread().name)
            self.cv.notify_all()

    def mark(self) -> int:
        with self.cv:
            return len(self.data)

    def wait_for(self, want: str, after: int = 0) -> int:
        """Waits until ``want`` shows after byte ``after``; returns the offset just past it."""
        needle = want.encode()

        def seen() -> bool:
            return self.data.find(needle, after) >= 0

        with self.cv:
            if not self.cv.wait_for(seen, timeout=PATIENCE):
                raise AssertionError(f"no {want!r} in {bytes(self.data)!r}")
            return self.data.find(needle, after) + len(needle)


def wait_until(cond: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + PATIENCE
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def test_a_terminal_resizes_echoes_and_its_shell_outlives_standby(kvm_store: pathlib.Path) -> None:
    sb = dormant.Sandbox.create(
        image="minimal", store=kvm_store, memory_mib=128, timeout=PATIENCE, idle_standby=None
    )
    screen = Screen()
    term = sb.pty.create(cols=80, rows=24, on_data=screen.add)
    assert isinstance(term, dormant.Pty) and term.pid > 0 and term.connected
    term.write(b'stty size; echo "term=$TERM"\n')
    screen.wait_for("24 80")
    screen.wait_for("term=xterm-256color")
    # Output comes from a background thread, not the caller's.
    assert threading.current_thread().name not in screen.threads
    term.resize(132, 43)
    mark = screen.mark()
    term.write("stty size\n")
    answered = screen.wait_for("43 132", after=mark)
    # Typed input echoes (the command line itself), then the command answers. Typed once the
    # shell waits for input (its prompt, ``~ # ``, after that answer): typed ahead, the echo
    # and the prompt may interleave, as on any terminal.
    screen.wait_for("# ", after=answered)
    mark = screen.mark()
    term.write("KEPT=kept-$((6*7)); echo typed-$KEPT\n")
    screen.wait_for("KEPT=kept-$((6*7)); echo typed-$KEPT", after=mark)
    screen.wait_for("typed-kept-42", after=mark)

    # Standby ends the attachment; the shell sleeps in the snapshot.
    snap = sb.standby()
    wait_until(lambda: not term.connected, "the attachment did not end at standby")
    with pytest.raises(OSError):
        term.write("echo lost\n")

    # Resumed in a new handle, connect finds the same shell with its variable.
    again = dormant.Sandbox.resume(snap, store=kvm_store, idle_standby=None)
    screen2 = Screen()
    term2 = again.pty.connect(term.pid, on_data=screen2.add)
    assert term2.pid == term.pid and term2.connected
    term2.write("echo again-$KEPT\n")
    screen2.wait_for("again-kept-42")

    # Bad input: clear errors, the terminal untouched.
    for cols, rows in [(0, 24), (80, 0), (5000, 24), (80, -1)]:
        with pytest.raises(dormant.InvalidArgument, match="from 1 to 4096"):
            term2.resize(cols, rows)
    with pytest.raises(dormant.InvalidArgument, match="from 1 to 4096"):
        again.pty.create(cols=0)
    with pytest.raises(dormant.InvalidArgument, match="no terminal"):
        again.pty.connect(term.pid + 100_000)
    with pytest.raises(dormant.InvalidArgument, match="cmd is empty"):
        again.pty.create("")
    with pytest.raises(TypeError):
        term2.write(123)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        again.pty.create(on_data="not callable")  # type: ignore[arg-type]

    # The shell's own exit: its code, the attachment ends once the output is delivered.
    mark = screen2.mark()
    term2.write("echo bye; exit 3\n")
    assert term2.wait(timeout=PATIENCE) == 3
    screen2.wait_for("bye", after=mark)
    assert not term2.connected

    # A program of one's choosing, killed.
    screen3 = Screen()
    cat = again.pty.create(["cat"], on_data=screen3.add)
    cat.write("meow\n")
    screen3.wait_for("meow\r\nmeow\r\n")
    cat.kill()
    assert cat.wait(timeout=PATIENCE) == 128 + 9
    again.kill()


def test_the_wasi_tier_has_no_terminal(store: pathlib.Path) -> None:
    sb = dormant.Sandbox.create(store=store)
    with pytest.raises(dormant.Unsupported, match="terminal"):
        sb.pty.create()
    sb.kill()
