# dormant-agent's Python driver: runs `run_code` cells in this interpreter, one at a time.
#
# The agent starts `python3 -u -c BOOTSTRAP`, whose bootstrap reads this file from the request
# pipe (descriptor _R) and runs it in __main__, with _R and _W (the reply pipe) set as globals.
# The protocol is in python/pipe.rs: a cell arrives as `u32 LE len | u8 flags | UTF-8 source`
# (flags bit 0: reseed the PRNGs first, the first cell after a resume); the answer
# is `u32 LE len | JSON {"error": ...}`. The cell's output is not in the answer: it goes to
# descriptors 1 and 2 (unbuffered, `-u`), which the agent reads, so `print`, `os.write(1, ...)`
# and subprocesses all land in the cell's stdout/stderr in the order they were written. The
# pipes to the agent are never descriptors 1 or 2, so nothing a cell writes can corrupt them.
#
# How a cell runs (parse with ast, a final expression's repr printed unless None, an exception
# reported with name/value/traceback while the session goes on) is the WASI tier's
# `_dormant_install().run` (wasi-tier/src/python.rs), with the exception record sent on the
# reply pipe instead of appended to stderr.
import sys as _sys


def _dormant_serve():
    import ast
    import json
    import os
    import signal
    import struct
    import traceback

    import __main__

    g = __main__.__dict__
    rfd, wfd = g.pop("_R"), g.pop("_W")
    for name in ("_dormant_serve", "os", "b", "c"):
        g.pop(name, None)
    _sys.argv = [""]
    # Children started by cells must not hold the agent's pipes.
    os.set_inheritable(rfd, False)
    os.set_inheritable(wfd, False)
    for stream in (_sys.stdout, _sys.stderr):
        try:
            stream.reconfigure(encoding="utf-8", errors="backslashreplace")
        except (AttributeError, ValueError):
            pass

    # The agent sends SIGINT (to the process group) once when a cell runs past its timeout or
    # its host went away; it interrupts the cell, never the driver between cells.
    in_cell = [False]

    def on_sigint(signum, frame):
        if in_cell[0]:
            in_cell[0] = False
            raise KeyboardInterrupt

    signal.signal(signal.SIGINT, on_sigint)

    def read_exact(n):
        buf = bytearray()
        while len(buf) < n:
            chunk = os.read(rfd, n - len(buf))
            if not chunk:
                # The agent closed the pipe: this session is over.
                os._exit(0)
            buf += chunk
        return bytes(buf)

    def write_all(data):
        view = memoryview(data)
        while view:
            view = view[os.write(wfd, view):]

    def text(f, limit, tail=False):
        try:
            s = f()
        except BaseException:
            s = "<unprintable>"
        if len(s) > limit:
            s = ("..." + s[-limit:]) if tail else (s[:limit] + "...")
        # Lone surrogates (from undecodable bytes) are not valid in the JSON the agent reads.
        return s.encode("utf-8", "backslashreplace").decode("utf-8")

    def run(src):
        error = None
        try:
            tree = ast.parse(src, "<cell>", "exec")
            last = None
            if tree.body and isinstance(tree.body[-1], ast.Expr):
                last = ast.Expression(tree.body.pop().value)
            exec(compile(tree, "<cell>", "exec"), g)
            if last is not None:
                v = eval(compile(last, "<cell>", "eval"), g)
                if v is not None:
                    print(repr(v))
        except BaseException as e:
            in_cell[0] = False
            tb = text(
                lambda: "".join(
                    traceback.format_exception(
                        type(e), e, e.__traceback__.tb_next if e.__traceback__ else None
                    )
                ),
                65536,
                tail=True,
            )
            error = {
                "name": text(lambda: type(e).__name__, 256),
                "value": text(lambda: str(e), 16384),
                "traceback": tb,
            }
            try:
                _sys.stdout.flush()
                _sys.stderr.write(tb)
            except BaseException:
                pass
        finally:
            in_cell[0] = False
            for stream in (_sys.stdout, _sys.stderr):
                try:
                    stream.flush()
                except BaseException:
                    pass
        return error

    def reseed():
        # As the WASI tier's `reseed`: fresh PRNG state from the (host-refreshed) entropy pool.
        mods = _sys.modules
        if "random" in mods:
            mods["random"].seed()
        if "numpy" in mods:
            try:
                mods["numpy"].random.seed()
            except Exception:
                pass

    while True:
        n, flags = struct.unpack("<IB", read_exact(5))
        src = read_exact(n).decode("utf-8", "replace")
        if flags & 1:
            reseed()
        in_cell[0] = True
        try:
            error = run(src)
        except KeyboardInterrupt:
            # Arrived in run's own bookkeeping, after the cell's code.
            in_cell[0] = False
            error = {"name": "KeyboardInterrupt", "value": "", "traceback": ""}
        body = json.dumps({"error": error}).encode()
        write_all(struct.pack("<I", len(body)) + body)


_dormant_serve()
