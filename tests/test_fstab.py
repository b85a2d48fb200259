"""fstab and systemd: the ways a host mounts lockfs at boot.

mount(8) runs ``mount.fuse3``, which runs ``lockfs SRC DST -o opts`` through
/bin/sh with PATH fixed to FIXED_PATH (NOTES.md): lockfs must be found there
(scripts/setup.sh links /usr/local/bin/lockfs) and must accept every option
mount.fuse3 hands it. The systemd unit in mount-helpers/ runs ``lockfs mount -f``
as a Type=notify service, so READY=1 must come from lockfs's main process and
only once the mount answers. systemd is not PID 1 here: the unit is verified,
and the readiness protocol is checked against a socket the test listens on.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import LOCKFS, _mounted, lockfs, require, run_in_ns, wait_for

from lockfs.cli import process_alive

FIXED_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
UNIT = Path(__file__).resolve().parent.parent / "mount-helpers" / "lockfs@.service"


def status(dst: Path) -> dict:
    result = lockfs("status", "--json", str(dst))
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def require_lockfs_on_fixed_path() -> None:
    """mount.fuse3 and the systemd unit find lockfs only in the system's directories."""
    if shutil.which("lockfs", path=FIXED_PATH) is None:
        pytest.fail("no 'lockfs' on mount.fuse3's fixed PATH; run scripts/setup.sh "
                    "(it links /usr/local/bin/lockfs)")


def require_fstab_path() -> None:
    """mount(8) must reach lockfs through mount.fuse3, as on a user's host."""
    fuse3 = require("mount.fuse3")
    require_lockfs_on_fixed_path()
    for directory in ("/sbin", "/usr/sbin"):
        helper = Path(directory) / "mount.fuse.lockfs"
        if helper.exists() and not os.path.samefile(helper, fuse3):
            pytest.fail(f"{helper} exists: mount(8) would run it instead of mount.fuse3 and "
                        "lockfs; this test checks the documented path (remove that helper)")


@pytest.fixture
def cleanup_mounts() -> Iterator[list[Path]]:
    """Mountpoints a test mounted by hand; unmounted and their daemons ended at the end."""
    mountpoints: list[Path] = []
    yield mountpoints
    for dst in mountpoints:
        daemon = 0
        with contextlib.suppress(Exception):
            daemon = int(status(dst)["daemon_pid"])
        for command in (["umount", str(dst)], ["umount", "-l", str(dst)]):
            if _mounted(dst):
                subprocess.run(command, capture_output=True, check=False)
        if daemon and process_alive(daemon):
            with contextlib.suppress(ProcessLookupError):
                os.kill(daemon, signal.SIGKILL)


def test_fstab_line_mounts_with_options_and_unmounts(tmp_path: Path,
                                                      cleanup_mounts: list[Path]) -> None:
    """`SRC DST fuse.lockfs defaults,hold=open,lockfile=...`: mount DST, use it, umount DST."""
    require_fstab_path()
    src, dst, lockdir = tmp_path / "src", tmp_path / "dst", tmp_path / "locks"
    for directory in (src, dst, lockdir):
        directory.mkdir()
    lockfile = lockdir / "pgdata.lease"
    fstab = tmp_path / "fstab"
    fstab.write_text(f"# lockfs test\n{src} {dst} fuse.lockfs "
                     f"defaults,hold=open,lockfile={lockfile} 0 0\n")
    cleanup_mounts.append(dst)

    mounted = subprocess.run(["mount", "-T", str(fstab), str(dst)], capture_output=True,
                             text=True, timeout=60, check=False)
    assert mounted.returncode == 0, mounted.stderr
    with open("/proc/self/mountinfo") as mountinfo:
        line = next(entry for entry in mountinfo if entry.split()[4] == str(dst))
    assert " - fuse.lockfs lockfs:" in line
    record = status(dst)
    assert record["hold"] == "open"
    assert record["lockfile"] == str(lockfile)
    assert record["source"] == str(src)
    assert lockfile.exists()
    assert not (src / ".lockfs-lease").exists()

    used = run_in_ns(f"echo from-fstab > {dst}/file && cat {dst}/file")
    assert used.returncode == 0, used.stderr
    assert (src / "file").read_text() == "from-fstab\n"

    daemon = int(record["daemon_pid"])
    unmounted = subprocess.run(["umount", str(dst)], capture_output=True, text=True,
                               timeout=60, check=False)
    assert unmounted.returncode == 0, unmounted.stderr
    assert not _mounted(dst)
    wait_for(lambda: not process_alive(daemon), 10, "the lockfs daemon to exit after umount")


def test_systemd_unit_verifies() -> None:
    """systemd-analyze finds no error or warning in the template unit."""
    analyze = require("systemd-analyze")
    require_lockfs_on_fixed_path()  # the unit's ExecStart is /usr/local/bin/lockfs
    result = subprocess.run([analyze, "verify", str(UNIT)], capture_output=True, text=True,
                            timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "", result.stderr
    text = UNIT.read_text()
    assert "Type=notify" in text
    assert "lockfs mount -f" in text


def receive_notification(sock: socket.socket, process: subprocess.Popen,
                         timeout: float) -> tuple[bytes, int]:
    """One sd_notify datagram and the pid that sent it (SCM_CREDENTIALS)."""
    deadline = time.monotonic() + timeout
    sock.settimeout(0.1)
    while time.monotonic() < deadline:
        try:
            data, ancillary, _flags, _addr = sock.recvmsg(4096, socket.CMSG_SPACE(12))
        except TimeoutError:
            if process.poll() is not None:
                pytest.fail(f"lockfs mount -f exited ({process.returncode}) before READY=1")
            continue
        sender = 0
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                sender = struct.unpack("iII", payload[:12])[0]
        return data, sender
    pytest.fail(f"no sd_notify message within {timeout} s")


def test_foreground_mount_sends_ready_after_mount_answers(tmp_path: Path,
                                                          cleanup_mounts: list[Path]) -> None:
    """Type=notify: READY=1 from the main pid, when DST is already mounted and answering."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    address = tmp_path / "notify.sock"
    log = tmp_path / "lockfs.log"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        sock.bind(str(address))
        cleanup_mounts.append(dst)
        process = subprocess.Popen(
            [*LOCKFS, "mount", "-f", str(src), str(dst), "--log-file", str(log)],
            env={**os.environ, "NOTIFY_SOCKET": str(address)},
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            message, sender = receive_notification(sock, process, 60)
            # Checked the moment READY=1 arrives: the mount exists and its daemon answers.
            assert _mounted(dst)
            record = status(dst)
            assert b"READY=1" in message.split(b"\n")
            assert sender == process.pid  # NotifyAccess=main accepts only the main pid
            assert record["daemon_pid"] == process.pid
            assert "mount ready at" in log.read_text()
        finally:
            process.send_signal(signal.SIGTERM)
            _out, err = process.communicate(timeout=30)
    assert process.returncode == 0, err
    assert not _mounted(dst)


EXAMPLE = UNIT.with_name("fstab.example")


def test_fstab_example_lines_mount_nosuid_nodev(tmp_path: Path,
                                                cleanup_mounts: list[Path]) -> None:
    """Every line of mount-helpers/fstab.example mounts (paths moved into tmp_path), with the
    nosuid,nodev a data volume wants although mount.fuse3 passes dev,suid by default."""
    require_fstab_path()
    lines = [line.split() for line in EXAMPLE.read_text().splitlines()
             if line.strip() and not line.lstrip().startswith("#")]
    assert lines, "fstab.example has no entries"
    for src_text, dst_text, kind, options, *_ in lines:
        assert kind == "fuse.lockfs"
        src, dst = tmp_path / src_text.lstrip("/"), tmp_path / dst_text.lstrip("/")
        src.mkdir(parents=True)
        dst.mkdir(parents=True)
        moved = []
        for option in options.split(","):
            if option.startswith("lockfile="):
                lockfile = tmp_path / option.removeprefix("lockfile=").lstrip("/")
                lockfile.parent.mkdir(parents=True, exist_ok=True)
                option = f"lockfile={lockfile}"
            moved.append(option)
        fstab = tmp_path / "fstab"
        fstab.write_text(f"{src} {dst} {kind} {','.join(moved)} 0 0\n")
        cleanup_mounts.append(dst)
        mounted = subprocess.run(["mount", "-T", str(fstab), str(dst)], capture_output=True,
                                 text=True, timeout=60, check=False)
        assert mounted.returncode == 0, f"{options}: {mounted.stderr}"
        with open("/proc/self/mountinfo") as mountinfo:
            line = next(entry for entry in mountinfo if entry.split()[4] == str(dst))
        flags = line.split()[5].split(",")
        assert "nosuid" in flags and "nodev" in flags, line
        record = status(dst)
        assert record["hold"] == ("open" if "hold=open" in options else "process")
        unmounted = subprocess.run(["umount", str(dst)], capture_output=True, text=True,
                                   timeout=60, check=False)
        assert unmounted.returncode == 0, unmounted.stderr
