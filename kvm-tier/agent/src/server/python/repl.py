# dormant-agent's Python driver: runs `run_code` cells in this interpreter, one at a time.
#
# The agent starts `python3 -u -c BOOTSTRAP`, whose bootstrap reads this file from the request
# pipe (descriptor _R) and runs it in __main__, with _R and _W (the reply pipe) set as globals.
# The protocol is in python/pipe.rs: a cell arrives as `u32 LE len | u8 flags | UTF-8 source`
# (flags bit 0: reseed the PRNGs first, the first cell after a resume); the answer
# is `u32 LE len | JSON {"error": ..., "results": [...]}` (`results` only when there are some). The cell's output is not in the answer: it goes to
# descriptors 1 and 2 (unbuffered, `-u`), which the agent reads, so `print`, `os.write(1, ...)`
# and subprocesses all land in the cell's stdout/stderr in the order they were written. The
# pipes to the agent are never descriptors 1 or 2, so nothing a cell writes can corrupt them.
#
# How a cell runs (parse with ast, a final expression's repr printed unless None, an exception
# reported with name/value/traceback while the session goes on, rich results: the final value's
# representations and every matplotlib figure as a PNG, figures closed after every cell) is the
# WASI tier's `_dormant_install().run` (wasi-tier/src/python.rs), with the exception and
# results records sent on the reply pipe instead of appended to stderr.
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

    # Rich results (as the WASI tier's bootstrap; the host checks their record's caps).
    MAX_RESULTS = 64
    cell = {"results": None}

    def add(r):
        rs = cell["results"]
        if rs is not None and len(rs) < MAX_RESULTS:
            rs.append(r)

    def b64(data):
        import base64

        return base64.b64encode(data).decode("ascii")

    def flush_figures():
        # Every open figure becomes a PNG result, then all are closed; only when the cell's
        # code imported pyplot.
        plt = _sys.modules.get("matplotlib.pyplot")
        if plt is None:
            return
        try:
            import io

            from matplotlib._pylab_helpers import Gcf

            for manager in Gcf.get_all_fig_managers():
                try:
                    buf = io.BytesIO()
                    manager.canvas.figure.savefig(buf, format="png")
                    add({"png": b64(buf.getvalue())})
                except Exception:
                    traceback.print_exc()
        finally:
            plt.close("all")

    def clean(s):
        # Lone surrogates are not valid in the JSON the host reads.
        return s.encode("utf-8", "backslashreplace").decode("utf-8")

    def main_result(v, text):
        r = {"text": clean(text), "is_main_result": True}
        for key, meth, kind in (
            ("html", "_repr_html_", str),
            ("markdown", "_repr_markdown_", str),
            ("svg", "_repr_svg_", str),
            ("png", "_repr_png_", bytes),
            ("json", "_repr_json_", None),
        ):
            if getattr(type(v), meth, None) is None:
                continue
            try:
                d = getattr(v, meth)()
                if isinstance(d, tuple) and len(d) == 2:
                    d = d[0]
                if d is None:
                    continue
                if kind is bytes:
                    if isinstance(d, str):
                        import base64

                        d = base64.b64decode(d)
                    if isinstance(d, (bytes, bytearray)):
                        r[key] = b64(bytes(d))
                elif kind is str:
                    if isinstance(d, str):
                        r[key] = clean(d)
                elif len(json.dumps(d, allow_nan=False)) <= 1 << 20:
                    r[key] = d
            except Exception:
                pass
        return r

    class Backend:
        # `_dormant_mpl`, the matplotlib backend (Agg's canvas, a show() that makes the open
        # figures results), made when matplotlib loads it; and as pyplot is first imported, it
        # becomes matplotlib's backend unless one was chosen (MPLBACKEND, or matplotlib.use of
        # another than the rc file's):
        # nothing is put in the environment, so programs a cell starts keep their own.
        @staticmethod
        def find_spec(name, path=None, target=None):
            if name == "matplotlib.pyplot":
                mpl = _sys.modules.get("matplotlib")
                try:
                    now = dict.__getitem__(mpl.rcParams, "backend")
                    if not os.environ.get("MPLBACKEND") and (
                        now is mpl.rcsetup._auto_backend_sentinel
                        or now == dict.__getitem__(mpl.rcParamsOrig, "backend")
                    ):
                        mpl.rcParams["backend"] = "module://_dormant_mpl"
                except Exception:
                    pass
                return None
            if name != "_dormant_mpl":
                return None
            import importlib.machinery

            return importlib.machinery.ModuleSpec(name, Backend)

        @staticmethod
        def create_module(spec):
            return None

        @staticmethod
        def exec_module(module):
            from matplotlib.backends import backend_agg

            module.FigureCanvas = backend_agg.FigureCanvasAgg
            module.FigureManager = backend_agg.FigureManager

            def show(*args, **kwargs):
                flush_figures()

            module.show = show

    _sys.meta_path.insert(0, Backend)

    def run(src):
        error = None
        cell["results"] = []
        try:
            tree = ast.parse(src, "<cell>", "exec")
            last = None
            if tree.body and isinstance(tree.body[-1], ast.Expr):
                last = ast.Expression(tree.body.pop().value)
            exec(compile(tree, "<cell>", "exec"), g)
            if last is not None:
                v = eval(compile(last, "<cell>", "eval"), g)
                if v is not None:
                    shown = repr(v)
                    print(shown)
                    add(main_result(v, shown))
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
            try:
                flush_figures()
            except BaseException:
                pass
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
        results, cell["results"] = cell["results"], None
        reply = {"error": error}
        if results:
            reply["results"] = results
        body = json.dumps(reply).encode()
        write_all(struct.pack("<I", len(body)) + body)


_dormant_serve()
