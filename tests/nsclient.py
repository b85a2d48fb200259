"""Run Python snippets as lockfs clients, and compare a mount with a plain directory.

Why: the pytest process must never open files through a mount (it would hold
the lease for as long as it lives, NOTES.md), so every snippet that opens or
changes something runs in a child in a new mount namespace. The child is the
system Python (/usr/bin/python3), which an unprivileged user can run; the
venv's interpreter lives under /root, which such a user cannot enter.

A snippet sees the helpers of ``PRELUDE``, runs with DST (or a reference
directory) as its working directory, and hands back ``result`` as JSON.
Running the same snippet in a plain directory on the backing filesystem
gives the answer a faithful passthrough must reproduce.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
from pathlib import Path
from typing import Any

from conftest import Mount, wait_for

CLIENT_PYTHON = "/usr/bin/python3"
NOBODY = 65534

PRELUDE = r'''
import ctypes, errno, hashlib, json, os, socket, stat, sys
os.chdir(sys.argv[1])
os.umask(int(sys.argv[2], 8))
libc = ctypes.CDLL(None, use_errno=True)
AT_FDCWD = -100
RENAME_NOREPLACE, RENAME_EXCHANGE, RENAME_WHITEOUT = 1, 2, 4
UTIME_NOW, UTIME_OMIT = (1 << 30) - 1, (1 << 30) - 2

def _check(ret, name):
    if ret != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), name)

def renameat2(old, new, flags):
    _check(libc.renameat2(AT_FDCWD, os.fsencode(old), AT_FDCWD, os.fsencode(new),
                          ctypes.c_uint(flags)), old)

class Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]

def utimensat(path, atime, mtime, follow=True):
    """Each time is (sec, nsec), UTIME_NOW or UTIME_OMIT."""
    times = (Timespec * 2)()
    for slot, value in enumerate((atime, mtime)):
        times[slot] = Timespec(0, value) if isinstance(value, int) else Timespec(*value)
    _check(libc.utimensat(AT_FDCWD, os.fsencode(path), times, 0 if follow else 0x100), path)

def err(fn, *args, **kwargs):
    """'ok' or the errno name the call failed with."""
    try:
        fn(*args, **kwargs)
    except OSError as exc:
        return errno.errorcode.get(exc.errno, str(exc.errno))
    return "ok"

def read(path):
    with open(path, "rb") as f:
        return f.read().decode()

def write(path, data, flags=os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode=0o644):
    fd = os.open(path, flags, mode)
    try:
        os.write(fd, data.encode())
    finally:
        os.close(fd)

def info(path):
    st = os.lstat(path)
    return {"mode": oct(st.st_mode), "uid": st.st_uid, "gid": st.st_gid,
            "size": st.st_size, "nlink": st.st_nlink}

result = None
'''

EPILOGUE = "\nprint(json.dumps(result))\n"


def snippet_command(where: Path, code: str, *, user: int | None = None,
                    umask: int = 0o022) -> list[str]:
    """The command that runs ``code`` in a new mount namespace with cwd ``where``."""
    command = ["unshare", "-m"]
    if user is not None:
        command += ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups"]
    return [*command, CLIENT_PYTHON, "-c", PRELUDE + code + EPILOGUE, str(where), oct(umask)]


def start_snippet(where: Path, code: str) -> subprocess.Popen[str]:
    """Start ``code`` as a client that a test talks to line by line (stdin, stdout)."""
    return subprocess.Popen(snippet_command(where, code), stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)


def run_snippet(where: Path, code: str, *, user: int | None = None, umask: int = 0o022,
                timeout: float = 180) -> Any:
    """Run ``code`` in a new mount namespace with cwd ``where``; return its ``result``."""
    done = subprocess.run(snippet_command(where, code, user=user, umask=umask),
                          capture_output=True, text=True, timeout=timeout, check=False)
    if done.returncode != 0:
        raise AssertionError(f"client failed ({done.returncode}):\n{done.stderr}")
    return json.loads(done.stdout.splitlines()[-1])


def wait_free(mount: Mount) -> None:
    """Wait until the last client's lease is gone, so that the next client may take it."""
    wait_for(lambda: mount.status()["state"] == "free", timeout=15,
             what="the lease to be released")


def client(mount: Mount, code: str, *, user: int | None = None, umask: int = 0o022,
           subdir: str = "") -> Any:
    """Run ``code`` as a new lockfs client inside DST; return its ``result``."""
    try:
        return run_snippet(mount.dst / subdir, code, user=user, umask=umask)
    finally:
        wait_free(mount)


def same_everywhere(pair: tuple[Mount, Path], code: str, *, user: int | None = None,
                    umask: int = 0o022) -> object:
    """Run ``code`` through the mount and in the reference; both must agree."""
    mount, ref = pair
    through_mount = client(mount, code, user=user, umask=umask)
    plain = run_snippet(ref, code, user=user, umask=umask)
    assert through_mount == plain
    assert tree(mount.src) == tree(ref)
    return through_mount


def tree(root: Path) -> dict[str, tuple]:
    """Everything a user would compare between two directories, timestamps aside.

    Hard links are shown as the first path that names the same inode, so that
    two trees with different inode numbers compare equal.
    """
    found: dict[str, tuple] = {}
    first_name: dict[int, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in sorted(dirnames + filenames):
            path = Path(dirpath) / name
            rel = str(path.relative_to(root))
            if rel == ".lockfs-lease":
                continue
            st = path.lstat()
            link = first_name.setdefault(st.st_ino, rel) if st.st_nlink > 1 else rel
            if stat.S_ISREG(st.st_mode):
                detail: object = path.read_bytes()
            elif stat.S_ISLNK(st.st_mode):
                detail = os.readlink(path)
            elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                detail = st.st_rdev
            else:
                detail = None
            found[rel] = (oct(st.st_mode), st.st_uid, st.st_gid, st.st_size, st.st_nlink,
                          link, detail, sorted(os.listxattr(path, follow_symlinks=False)))
    return found


def daemon_fds(mount: Mount) -> int:
    """How many descriptors the daemon holds (each known inode costs one)."""
    return len(os.listdir(f"/proc/{mount.daemon_pid}/fd"))
