"""The GIL is released during calls, and Ctrl-C interrupts a long run_code."""

from __future__ import annotations

import os
import pathlib
import signal
import threading

import pytest

import dormant

# Waits (up to a minute) until the other sandbox's file appears in the shared volume.
RENDEZVOUS = """
import os, time
open('/shared/{me}', 'w').close()
t = time.monotonic()
while not os.path.exists('/shared/{other}') and time.monotonic() - t < 60:
    pass
print('met' if os.path.exists('/shared/{other}') else 'alone')
"""


def test_two_sandboxes_in_two_threads_run_at_once(
    store: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    # Each call spins until the other call has started: if one call held the GIL (or a lock
    # shared by the two) the first would never see the second and print "alone".
    shared = tmp_path / "shared"
    shared.mkdir()
    a, b = (
        dormant.Sandbox.create(store=store, idle_standby=None, volumes={"/shared": shared})
        for _ in range(2)
    )
    results: dict[str, str] = {}

    def run(name: str, sb: dormant.Sandbox, other: str) -> None:
        results[name] = sb.run_code(RENDEZVOUS.format(me=name, other=other)).stdout

    threads = [
        threading.Thread(target=run, args=("a", a, "b")),
        threading.Thread(target=run, args=("b", b, "a")),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == {"a": "met\n", "b": "met\n"}


@pytest.mark.timeout(300)
@pytest.mark.usefixtures("sigint_raises")
def test_ctrl_c_interrupts_a_long_run_code(store: pathlib.Path) -> None:
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signals reach only the main thread")
    # The call's own deadline bounds the test too, should the interrupt not work.
    sb = dormant.Sandbox.create(store=store, idle_standby=None, timeout=120)
    sb.run_code("kept = 'yes'")
    good = sb.checkpoint()
    timer = threading.Timer(1.0, os.kill, args=(os.getpid(), signal.SIGINT))
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            sb.run_code("while True: pass")
    finally:
        timer.cancel()
    # Clearly invalid, and says how to recover.
    assert sb.state == "poisoned"
    with pytest.raises(dormant.InvalidState) as e:
        sb.run_code("1")
    assert good in str(e.value)
    again = dormant.Sandbox.resume(good, store=store, idle_standby=None)
    assert again.run_code("print(kept)").stdout == "yes\n"
