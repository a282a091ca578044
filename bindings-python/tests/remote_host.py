"""One host of the object-store tests, run as its own process (its own cache):
``python remote_host.py ACTION JSON``. Prints one JSON line per step on stdout."""

from __future__ import annotations

import json
import sys
import time

import dormant


def out(**kw: object) -> None:
    print(json.dumps(kw), flush=True)


def main() -> None:
    action, args = sys.argv[1], json.loads(sys.argv[2])
    store = dormant.Store(
        args["url"],
        endpoint_url=args["endpoint"],
        cache_dir=args["cache"],
        lease_ttl=args.get("ttl", 30),
        request_timeout=args.get("timeout", 10),
    )
    if action == "create":
        # A Python session (WASI) or a Linux sandbox with files and a background process.
        t0 = time.monotonic()
        sb = dormant.Sandbox.create(args["tier"], store=store)
        if args["tier"] == "wasi":
            sb.run_code("import pandas as pd\nx = 41\ndf = pd.DataFrame({'a': [1, 2, 3]})")
            sb.files.write("/data/notes.txt", "from host A")
        else:
            sb.files.write("/root/notes.txt", "from host A")
            sb.commands.run("sleep 100000", background=True)
        snap = sb.standby(durable=True)
        out(id=sb.id, snapshot=snap, seconds=time.monotonic() - t0)
    elif action == "crash":
        # A durable standby, then a large change whose upload is under way when the test
        # kills this process (kill -9).
        sb = dormant.Sandbox.create("wasi", store=store)
        sb.run_code("x = 41")
        out(id=sb.id, durable=sb.standby(durable=True))
        sb.run_code("import numpy as np\nnoise = np.random.default_rng(1).random(4_000_000)")
        out(background=sb.standby())
        time.sleep(3600)
    elif action == "from_template":
        sb = dormant.Sandbox.create(template=args["template"], store=store)
        out(value=sb.run_code("print(prepared)").stdout.strip(), id=sb.id)
    elif action == "check":
        t0 = time.monotonic()
        sb = dormant.Sandbox.connect(args["id"], store=store)
        resumed = time.monotonic() - t0
        if sb.tier == "wasi":
            value = sb.run_code("print(x + 1, df['a'].sum())").stdout.strip()
            notes = sb.files.read_text("/data/notes.txt")
        else:
            value = sb.commands.run("pgrep -x sleep >/dev/null && echo running").stdout.strip()
            notes = sb.files.read_text("/root/notes.txt")
        sb.standby(durable=True)
        out(value=value, notes=notes, resume_seconds=resumed)
    elif action == "hold":
        # Resume at the time given (so that two hosts race), report, then on each line of
        # stdin checkpoint and report.
        time.sleep(max(0.0, args["at"] - time.time()))
        try:
            sb = dormant.Sandbox.connect(args["id"], store=store)
        except dormant.SandboxBusy as e:
            out(held=False, error="SandboxBusy", message=str(e))
            return
        out(held=True)
        for line in sys.stdin:
            if line.strip() == "checkpoint":
                try:
                    sb.run_code("x = 'A was here'")
                    sb.checkpoint(durable=True)
                    out(checkpoint="ok")
                except dormant.LeaseLost as e:
                    out(checkpoint="LeaseLost", message=str(e))
            elif line.strip() == "exit":
                return
    elif action == "take":
        # Resume as soon as the lease allows (SandboxBusy until it expires), then report.
        deadline = time.monotonic() + args["within"]
        busy = 0
        while True:
            try:
                sb = dormant.Sandbox.connect(args["id"], store=store)
                break
            except dormant.SandboxBusy:
                busy += 1
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        value = sb.run_code("print(x)").stdout.strip()
        sb.run_code("x = 'B took over'")
        sb.standby(durable=True)
        out(busy=busy, value=value)
    else:
        raise SystemExit(f"unknown action {action}")


if __name__ == "__main__":
    main()
