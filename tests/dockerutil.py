"""A private Docker daemon for the tests, and PostgreSQL containers run by it.

No image registry is reachable here, so the image is a tiny root directory
made with ``docker import`` (passwd/group with the host's postgres ids, tmp,
and bin/lib/lib64/sbin as links into usr); containers run the host's
PostgreSQL with ``-v /usr:/usr:ro --network none --user postgres``.
The daemon (Debian's docker.io) gets its own data root, exec root and socket,
so it never touches a system Docker, and is stopped by its pid at the end.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import signal
import subprocess
import tarfile
import tempfile
from pathlib import Path

import pytest
from conftest import wait_for
from pgutil import READY, pg_bin, postgres_ids, psql

DOCKER = "/usr/bin/docker"  # Debian's CLI (a newer one in /usr/local/bin does not fit 20.10)
DOCKERD_CANDIDATES = ("/usr/bin/dockerd", "/usr/sbin/dockerd")
IMAGE = "lockfs-test/pg:1"
DATA = "/var/lib/postgresql/data"
SOCKETS = "/run/postgresql"


def _dockerd() -> str:
    for path in DOCKERD_CANDIDATES:
        if os.access(path, os.X_OK):
            return path
    pytest.fail("this test needs Debian's dockerd (package docker.io)")


class Docker:
    """One private dockerd: its directory, its socket, its pid."""

    def __init__(self) -> None:
        if not os.access(DOCKER, os.X_OK):
            pytest.fail(f"this test needs {DOCKER} (package docker.io)")
        self.dir = Path(tempfile.mkdtemp(prefix="lockfs-docker-", dir="/tmp"))
        self.socket = self.dir / "sock"
        self.log = self.dir / "dockerd.log"
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(
                [_dockerd(), "--data-root", str(self.dir / "root"),
                 "--exec-root", str(self.dir / "exec"), "--pidfile", str(self.dir / "pid"),
                 "-H", f"unix://{self.socket}", "--iptables=false", "--ip6tables=false",
                 "--bridge=none", "--storage-driver=vfs"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True)

    def wait_ready(self) -> None:
        def answers() -> bool:
            if self.process.poll() is not None:
                pytest.fail(f"dockerd exited ({self.process.returncode}):\n"
                            f"{self.log.read_text()[-3000:]}")
            return self.cli("info", check=False).returncode == 0
        wait_for(answers, 60, "the private dockerd to answer")

    def cli(self, *args: str, check: bool = True, timeout: float = 120,
            stdin: bytes | None = None) -> subprocess.CompletedProcess:
        result = subprocess.run([DOCKER, "-H", f"unix://{self.socket}", *args],
                                input=stdin, capture_output=True, timeout=timeout, check=False)
        if check and result.returncode != 0:
            raise AssertionError(f"docker {' '.join(args)} failed ({result.returncode}): "
                                 f"{result.stderr.decode(errors='replace')}")
        return result

    def build_image(self) -> None:
        """``docker import`` of a root directory with just enough to run the host's binaries."""
        uid, gid = postgres_ids()
        files = {
            "etc/passwd": (f"root:x:0:0:root:/root:/bin/sh\n"
                           f"postgres:x:{uid}:{gid}:PostgreSQL:/var/lib/postgresql:/bin/sh\n"),
            "etc/group": f"root:x:0:\npostgres:x:{gid}:\n",
        }
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w") as tar:
            for directory, mode in (("etc", 0o755), ("tmp", 0o1777), ("usr", 0o755),
                                    ("var/lib/postgresql", 0o755), ("run/postgresql", 0o755)):
                # parents first; var/run (a link) comes after var exists
                parts = directory.split("/")
                for depth in range(1, len(parts) + 1):
                    info = tarfile.TarInfo("/".join(parts[:depth]))
                    info.type, info.mode = tarfile.DIRTYPE, mode
                    tar.addfile(info)
            links = {name: f"usr/{name}" for name in ("bin", "lib", "lib64", "sbin")}
            links["var/run"] = "../run"
            for link, target in links.items():
                info = tarfile.TarInfo(link)
                info.type, info.linkname = tarfile.SYMTYPE, target
                tar.addfile(info)
            for name, text in files.items():
                data = text.encode()
                info = tarfile.TarInfo(name)
                info.size, info.mode = len(data), 0o644
                tar.addfile(info, io.BytesIO(data))
        self.cli("import", "-", IMAGE, stdin=buffer.getvalue())

    def remove_all_containers(self) -> None:
        names = self.cli("ps", "-aq", check=False).stdout.decode().split()
        if names:
            self.cli("rm", "-f", *names, check=False)

    def stop(self) -> None:
        """Stop the daemon by its pid, then remove its directory if nothing is mounted there."""
        with contextlib.suppress(Exception):
            self.remove_all_containers()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        prefix = str(self.dir) + "/"
        with open("/proc/self/mountinfo") as mountinfo:
            leftovers = [line.split()[4] for line in mountinfo
                         if line.split()[4].startswith(prefix)]
        for path in sorted(leftovers, reverse=True):
            subprocess.run(["umount", "-l", path], capture_output=True, check=False)
        with open("/proc/self/mountinfo") as mountinfo:
            if any(line.split()[4].startswith(prefix) for line in mountinfo):
                return  # never delete through a mount; leave it for inspection
        shutil.rmtree(self.dir, ignore_errors=True)


class PgContainer:
    """A PostgreSQL container: data volume at DATA, socket directory shared with the host."""

    def __init__(self, docker: Docker, name: str, data: Path, sockdir: Path) -> None:
        self.docker = docker
        self.name = name
        self.sockdir = sockdir
        docker.cli("run", "-d", "--name", name, "--network", "none", "--user", "postgres",
                   "-v", "/usr:/usr:ro", "-v", f"{data}:{DATA}", "-v", f"{sockdir}:{SOCKETS}",
                   IMAGE, pg_bin("postgres"), "-D", DATA, "-k", SOCKETS,
                   "-c", "listen_addresses=")

    def logs(self) -> str:
        result = self.docker.cli("logs", self.name, check=False)
        return (result.stdout + result.stderr).decode(errors="replace")

    def state(self) -> tuple[bool, int]:
        """(running, exit code) from docker inspect."""
        out = self.docker.cli("inspect", "-f", "{{.State.Running}} {{.State.ExitCode}}",
                              self.name).stdout.decode().split()
        return out[0] == "true", int(out[1])

    def wait_ready(self, timeout: float = 60) -> None:
        def ready() -> bool:
            if READY in self.logs():
                return True
            running, code = self.state()
            if not running and self.docker.cli("inspect", "-f", "{{.State.Status}}",
                                               self.name).stdout.strip() == b"exited":
                pytest.fail(f"container {self.name} exited ({code}):\n{self.logs()}")
            return False
        wait_for(ready, timeout, f"container {self.name} to be ready")

    def wait_exit(self, timeout: float = 60) -> int:
        result = self.docker.cli("wait", self.name, timeout=timeout)
        return int(result.stdout.decode().strip())

    def psql(self, query: str) -> str:
        return psql(self.sockdir, query)

    def stop_and_remove(self) -> None:
        """docker stop (SIGTERM: smart shutdown), then docker rm."""
        self.docker.cli("stop", "-t", "30", self.name)
        self.docker.cli("rm", self.name)


def initdb_in_container(docker: Docker, data: Path) -> subprocess.CompletedProcess:
    """initdb the way an image's entrypoint does it: in a throwaway container on the volume."""
    return docker.cli("run", "--rm", "--network", "none", "--user", "postgres",
                      "-v", "/usr:/usr:ro", "-v", f"{data}:{DATA}", IMAGE,
                      pg_bin("initdb"), "-D", DATA, "--no-locale", "-E", "UTF8", "-A", "trust",
                      "--no-sync", check=False)

