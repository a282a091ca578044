"""A coding agent's session on the `coding` image, end to end, with the real tools: a git
repository made by the host's git and shared on a volume, cloned and committed to in the guest;
a wheel built here installed with pip; node, and npm installing a local package; a Python HTTP server in the background; a run_code
variable. Then standby, and a resume **in a new host process** that finds all of it still there.

Skipped, with the reason, where the KVM tier cannot run or the Debian image cannot be built
(it needs root and apt)."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import pathlib
import shutil
import subprocess
import sys
import textwrap
import zipfile

import pytest

import dormant

from conftest import KVM_OK, KVM_WHY

# Generous: guest kernel code is emulated on PVM hosts (a `pip install` takes a minute there).
TIMEOUT = 900


def build_wheel(out: pathlib.Path) -> pathlib.Path:
    """A pure-Python wheel, written by hand (a wheel is a zip with a dist-info directory), so
    the test needs no build backend on the host."""
    files = {
        "greet/__init__.py": b"def hello(who):\n    return f'hello {who} from greet'\n",
        "greet-1.0.dist-info/METADATA": b"Metadata-Version: 2.1\nName: greet\nVersion: 1.0\n",
        "greet-1.0.dist-info/WHEEL": (
            b"Wheel-Version: 1.0\nGenerator: dormant-test\nRoot-Is-Purelib: true\n"
            b"Tag: py3-none-any\n"
        ),
    }
    record = []
    for name, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{name},sha256={digest},{len(data)}")
    record.append("greet-1.0.dist-info/RECORD,,")
    path = out / "greet-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
        z.writestr("greet-1.0.dist-info/RECORD", "\n".join(record) + "\n")
    return path


def git(*args: str, cwd: pathlib.Path) -> None:
    env = dict(os.environ, GIT_AUTHOR_NAME="host", GIT_AUTHOR_EMAIL="host@example.com",
               GIT_COMMITTER_NAME="host", GIT_COMMITTER_EMAIL="host@example.com")
    subprocess.run(["git", *args], cwd=cwd, env=env, check=True, capture_output=True)


RESUME = textwrap.dedent(
    """
    import json, sys
    import dormant
    snap, store, src, wheels = sys.argv[1:5]
    sb = dormant.Sandbox.resume(snap, store=store, idle_standby=None,
                                volumes={"/mnt/src": src, "/mnt/wheels": wheels})
    run = lambda c: sb.commands.run(c, timeout=900)
    page = run("curl -s http://127.0.0.1:8000/README.md")
    log = run("git -C /root/app log --format=%s")
    imp = run("python3 -c 'import greet; print(greet.hello(\\"guest\\"))'")
    var = sb.run_code("answer * 2")
    print(json.dumps({"page": page.stdout, "page_code": page.exit_code, "log": log.stdout,
                      "import": imp.stdout + imp.stderr, "var": var.stdout,
                      "error": var.error.name if var.error else None}))
    sb.kill()
    """
)


@pytest.mark.skipif(not KVM_OK, reason=f"SKIPPED: the KVM tier cannot run here: {KVM_WHY}")
@pytest.mark.timeout(2400)
def test_a_coding_agent_session_survives_standby_and_a_new_process(
    tmp_path: pathlib.Path,
) -> None:
    if shutil.which("git") is None:
        pytest.skip("SKIPPED: the host has no git to make the repository with")
    if os.geteuid() != 0 and not any(i.name == "coding" for i in dormant.list_images()):
        pytest.skip("SKIPPED: the coding image is not built and building it needs root")
    store = tmp_path / "store"
    src = tmp_path / "src"
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    repo = src / "repo"
    repo.mkdir(parents=True)
    (repo / "README.md").write_text("# shop-api\nserved from the sandbox\n")
    git("init", "-q", "-b", "main", cwd=repo)
    git("add", "README.md", cwd=repo)
    git("commit", "-q", "-m", "initial import", cwd=repo)
    build_wheel(wheels)
    # A local npm package (the sandbox has no network: npm installs it from the volume).
    npm_pkg = src / "greet-js"
    npm_pkg.mkdir()
    (npm_pkg / "package.json").write_text(
        json.dumps({"name": "greet-js", "version": "1.0.0", "main": "index.js"})
    )
    (npm_pkg / "index.js").write_text("exports.hi = () => 'hi from greet-js';\n")

    sb = dormant.Sandbox.create(
        image="coding",
        store=store,
        memory_mib=512,
        timeout=TIMEOUT,
        idle_standby=None,
        volumes={"/mnt/src": str(src), "/mnt/wheels": str(wheels)},
    )

    def run(cmd: str) -> dormant.CommandResult:
        r = sb.commands.run(cmd, timeout=TIMEOUT)
        assert isinstance(r, dormant.CommandResult)
        assert r.exit_code == 0, f"{cmd}: exit {r.exit_code}\n{r.stdout}\n{r.stderr}"
        return r

    run("git clone -q /mnt/src/repo /root/app")
    run(
        "cd /root/app && echo 'print(42)' > app.py && git add app.py && "
        "git -c user.name=agent -c user.email=agent@example.com commit -q -m 'add the app'"
    )
    run("pip install -q --no-index --no-cache-dir /mnt/wheels/greet-1.0-py3-none-any.whl")
    assert run("node -e 'console.log(6 * 7)'").stdout == "42\n"
    run("cd /root/app && npm install --offline --no-audit --no-fund --install-links "
        "/mnt/src/greet-js >/dev/null")
    got = run("cd /root/app && node -e \"console.log(require('greet-js').hi())\"").stdout
    assert got == "hi from greet-js\n"
    server = sb.commands.run(
        "exec python3 -m http.server 8000 --bind 127.0.0.1 -d /root/app", background=True
    )
    assert isinstance(server, dormant.CommandHandle)
    # Ready once it answers (inside the guest: this sandbox has no network to the host).
    run("for i in $(seq 600); do curl -sf -o /dev/null http://127.0.0.1:8000/ && exit 0; "
        "sleep 1; done; exit 1")
    ex = sb.run_code("import greet\nanswer = 21\ngreet.hello('cell')")
    assert ex.error is None, ex.error
    assert ex.stdout == "'hello cell from greet'\n"
    snap = sb.standby()

    # A new host process resumes it: the server, the commit, the package and the variable.
    out = subprocess.run(
        [sys.executable, "-c", RESUME, snap, str(store), str(src), str(wheels)],
        capture_output=True,
        text=True,
        timeout=2 * TIMEOUT,
    )
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["page_code"] == 0 and got["page"] == "# shop-api\nserved from the sandbox\n", got
    assert got["log"] == "add the app\ninitial import\n", got
    assert got["import"] == "hello guest from greet\n", got
    assert (got["var"], got["error"]) == ("42\n", None), got
