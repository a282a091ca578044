"""Python-side resume benchmark (issue 5): from ``Sandbox.resume`` to the first answer, in
this process and in a fresh Python process, for both tiers.

    python bindings-python/bench.py [--runs N] [--store DIR] [--skip-kvm]

Each figure is the median (and min/max) of N runs, measured with time.perf_counter:
- in-process: ``Sandbox.resume(snapshot)`` then the first ``run_code`` (WASI) or
  ``commands.run`` (KVM) returning its result;
- fresh process: a new ``python -c`` that imports dormant, resumes and answers, timed from
  the start of the child process to its exit (interpreter start-up included), plus the same
  child's own resume-to-answer time.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time

import dormant

CHILD = """
import sys, time
t0 = time.perf_counter()
import dormant
t1 = time.perf_counter()
sb = dormant.Sandbox.resume(sys.argv[1], store=sys.argv[2], idle_standby=None)
if sys.argv[3] == "wasi":
    out = sb.run_code("print(total)").stdout
else:
    out = sb.commands.run(["cat", "/root/answer"]).stdout
t2 = time.perf_counter()
assert out.strip() == "42", out
print(f"{(t2 - t1) * 1000:.3f} {(t1 - t0) * 1000:.3f}")
"""


def stats(xs: list[float]) -> str:
    return f"{statistics.median(xs):9.1f} ms (min {min(xs):.1f}, max {max(xs):.1f})"


def prepare(tier: str, store: str) -> str:
    if tier == "wasi":
        sb = dormant.Sandbox.create("wasi", store=store, idle_standby=None)
        sb.run_code("import pandas as pd\ndf = pd.DataFrame({'x': range(100_000)})\ntotal = 42")
    else:
        sb = dormant.Sandbox.create(
            "kvm", store=store, idle_standby=None, memory_mib=128, timeout=300
        )
        sb.files.write("/root/answer", "42\n")
    return sb.standby()


def measure(tier: str, store: str, runs: int) -> None:
    t = time.perf_counter()
    snap = prepare(tier, store)
    print(f"[{tier}] created and put in standby in {time.perf_counter() - t:.1f} s")
    inproc = []
    for _ in range(runs):
        t0 = time.perf_counter()
        sb = dormant.Sandbox.resume(snap, store=store, idle_standby=None)
        if tier == "wasi":
            out = sb.run_code("print(total)").stdout
        else:
            out = sb.commands.run(["cat", "/root/answer"]).stdout
        inproc.append((time.perf_counter() - t0) * 1000)
        assert out.strip() == "42", out
        sb.kill()
    child_total, child_resume, child_import = [], [], []
    for _ in range(runs):
        t0 = time.perf_counter()
        p = subprocess.run(
            [sys.executable, "-c", CHILD, snap, store, tier],
            capture_output=True, text=True, timeout=900,
        )
        child_total.append((time.perf_counter() - t0) * 1000)
        if p.returncode != 0:
            raise SystemExit(p.stderr)
        r, i = p.stdout.split()
        child_resume.append(float(r))
        child_import.append(float(i))
    first = "first run_code" if tier == "wasi" else "first commands.run"
    print(f"[{tier}] in process: resume -> {first}: {stats(inproc)}")
    print(f"[{tier}] fresh process, resume -> {first}: {stats(child_resume)}")
    print(f"[{tier}] fresh process, import dormant:   {stats(child_import)}")
    print(f"[{tier}] fresh process, whole child (python start to exit): {stats(child_total)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--store", default=None)
    ap.add_argument("--skip-kvm", action="store_true")
    a = ap.parse_args()
    store = a.store or tempfile.mkdtemp(prefix="dormant-pybench-")
    print(f"store {store}; {a.runs} runs each; dormant {dormant.__version__}")
    measure("wasi", store, a.runs)
    ok, why = dormant.kvm_available()
    if a.skip_kvm or not ok:
        print(f"[kvm] skipped: {why if not ok else '--skip-kvm'}")
    else:
        measure("kvm", store, a.runs)


if __name__ == "__main__":
    main()
