"""Random programs of file operations, run through a mount and in a plain directory.

Why: the single-operation tests check what their authors thought of; a
random mix finds what comes out of sequences (a name that is a file, then a
directory, then a symlink; a directory whose mode forbids what comes next;
renames over and between all of them). Each program runs as one client, as
``nobody`` (or root), once through lockfs and once in a plain directory of the same
filesystem; every step's result (value or errno) and the final trees must be
the same. Seeds are fixed, so a failure names the program that shows it.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import Mount, mount_with_reference
from nsclient import NOBODY, client, run_snippet, tree

STEPS = 250
# (seed, user, mount options). LOCKFS_DIFFERENTIAL_SEEDS=N adds N more seeds
# (alternating nobody and root, with and without the writeback cache) for a
# longer hunt by hand.
CASES = ([(seed, NOBODY, ()) for seed in range(16)]
         + [(seed, 0, ()) for seed in range(100, 106)]
         + [(seed, NOBODY, ("-o", "writeback_cache")) for seed in range(200, 204)]
         + [(seed, NOBODY if seed % 2 else 0, ("-o", "writeback_cache") if seed % 4 > 1 else ())
            for seed in range(1000, 1000 + int(os.environ.get("LOCKFS_DIFFERENTIAL_SEEDS", 0)))])

NAMES = ("a", "b", "c", "d", "d/e", "d/f", "d/g", "d/g/h", "s", "d/s")
FILE_NAMES = ("a", "b", "d/e", "d/f", "d/g/h", "d/s", "s")  # usually made as files
DIR_NAMES = ("c", "d", "d/g")  # usually made as directories
SYMLINK_TARGETS = ("a", "b", "d", "d/e", "g", "missing")  # relative, never "..": stay inside
OPEN_FLAGS = (
    os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
    os.O_WRONLY | os.O_CREAT | os.O_EXCL,
    os.O_WRONLY | os.O_CREAT | os.O_APPEND,
    os.O_WRONLY | os.O_APPEND,
    os.O_RDWR,
    os.O_WRONLY | os.O_TRUNC,
)
MODES = (0o644, 0o600, 0o755, 0o700, 0o444, 0o555, 0o000, 0o1777, 0o2755)
SIZES = (0, 3, 100, 5000)
ACCESS = (os.F_OK, os.R_OK, os.W_OK, os.X_OK, os.R_OK | os.W_OK)
RENAME_FLAGS = (0, 0, 1, 2)  # plain twice as often; RENAME_NOREPLACE; RENAME_EXCHANGE
XATTR_FLAGS = (0, os.XATTR_CREATE, os.XATTR_REPLACE)
TIME_NS = 1_500_000_000_123_456_789
OWNERS = (-1, 65534, 0, 4242)  # -1: unchanged; nobody; root; a stranger

EXECUTOR = r"""
PROGRAM = json.loads(PROGRAM_JSON)

def kind_and_mode(st):
    is_dir = stat.S_ISDIR(st.st_mode)
    # Directory sizes and link counts depend on the filesystem's history of the
    # directory, not on the passthrough: compared through the final trees instead.
    return [stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid,
            None if is_dir else st.st_size, None if is_dir else st.st_nlink]

def step(op, *a):
    if op == "write":
        fd = os.open(a[0], a[2] | os.O_NONBLOCK, 0o666)  # a fifo must not block
        try:
            return os.write(fd, a[1].encode())
        finally:
            os.close(fd)
    if op == "read":
        fd = os.open(a[0], os.O_RDONLY | os.O_NONBLOCK)
        try:
            return os.read(fd, 8192).decode(errors="replace")
        finally:
            os.close(fd)
    if op == "mkdir":
        return os.mkdir(a[0], a[1])
    if op == "rmdir":
        return os.rmdir(a[0])
    if op == "unlink":
        return os.unlink(a[0])
    if op == "rename":
        return renameat2(a[0], a[1], a[2])
    if op == "link":
        return os.link(a[0], a[1], follow_symlinks=False)
    if op == "symlink":
        return os.symlink(a[0], a[1])
    if op == "readlink":
        return os.readlink(a[0])
    if op == "chmod":
        return os.chmod(a[0], a[1])
    if op == "truncate":
        return os.truncate(a[0], a[1])
    if op == "stat":
        return kind_and_mode(os.stat(a[0], follow_symlinks=a[1]))
    if op == "list":
        return sorted(os.listdir(a[0]))
    if op == "setxattr":
        return os.setxattr(a[0], "user.k", a[1].encode(), a[2])
    if op == "getxattr":
        return os.getxattr(a[0], "user.k").decode()
    if op == "removexattr":
        return os.removexattr(a[0], "user.k")
    if op == "mkfifo":
        return os.mkfifo(a[0], 0o644)
    if op == "utime":
        os.utime(a[0], ns=(a[1], a[1]))
        return os.stat(a[0]).st_mtime_ns
    if op == "access":
        return os.access(a[0], a[1])
    if op == "chown":
        return os.chown(a[0], a[1], a[2], follow_symlinks=False)
    if op == "handle":  # several calls on one open handle
        fd = os.open(a[0], os.O_RDWR | os.O_NONBLOCK)
        try:
            os.pwrite(fd, a[1].encode(), a[2])
            os.ftruncate(fd, a[3])
            os.fchmod(fd, a[4])
            return [os.pread(fd, 8192, 0).decode(errors="replace"), os.fstat(fd).st_size]
        finally:
            os.close(fd)
    if op == "pappend":  # pwrite on an O_APPEND descriptor appends on Linux
        fd = os.open(a[0], os.O_WRONLY | os.O_APPEND | os.O_NONBLOCK)
        try:
            os.pwrite(fd, a[1].encode(), 0)
            return os.fstat(fd).st_size
        finally:
            os.close(fd)
    if op == "mksock":
        return os.mknod(a[0], stat.S_IFSOCK | 0o644)
    raise ValueError(op)

results = []
for index, (op, *args) in enumerate(PROGRAM):
    try:
        value = step(op, *args)
    except OSError as exc:
        value = "errno " + errno.errorcode.get(exc.errno, str(exc.errno))
    results.append([index, op, *args, value])
result = results
"""


def program(seed: int) -> list[list[object]]:
    """``STEPS`` random operations on a few overlapping names."""
    rng = random.Random(seed)
    def name(usual: tuple[str, ...] = NAMES) -> str:
        return rng.choice(usual if rng.random() < 0.85 else NAMES)

    makers = {
        "write": lambda: [name(FILE_NAMES), rng.choice(("", "x", "hello", "0123456789" * 30)),
                          rng.choice(OPEN_FLAGS)],
        "read": lambda: [name()],
        "mkdir": lambda: [name(DIR_NAMES), rng.choice((0o755, 0o700, 0o777))],
        "rmdir": lambda: [name()],
        "unlink": lambda: [name()],
        "rename": lambda: [name(), name(), rng.choice(RENAME_FLAGS)],
        "link": lambda: [name(), name()],
        "symlink": lambda: [rng.choice(SYMLINK_TARGETS), name(FILE_NAMES)],
        "readlink": lambda: [name()],
        "chmod": lambda: [name(), rng.choice(MODES)],
        "truncate": lambda: [name(), rng.choice(SIZES)],
        "stat": lambda: [name(), rng.random() < 0.5],
        "list": lambda: [rng.choice((".", "d", "d/g", "s"))],
        "setxattr": lambda: [name(), rng.choice(("1", "22")), rng.choice(XATTR_FLAGS)],
        "getxattr": lambda: [name()],
        "removexattr": lambda: [name()],
        "mkfifo": lambda: [name(FILE_NAMES)],
        "utime": lambda: [name(), TIME_NS],
        "access": lambda: [name(), rng.choice(ACCESS)],
        "chown": lambda: [name(), rng.choice(OWNERS), rng.choice(OWNERS)],
        "handle": lambda: [name(FILE_NAMES), rng.choice(("y", "abc" * 50)),
                           rng.choice(SIZES), rng.choice(SIZES), rng.choice(MODES)],
        "mksock": lambda: [name(FILE_NAMES)],
        "pappend": lambda: [name(FILE_NAMES), rng.choice(("z", "tail" * 20))],
    }
    # Creating steps more often than the others, so that names exist to act on.
    weights = {"write": 8, "mkdir": 3, "symlink": 2, "rename": 3, "stat": 3, "read": 3,
               "chmod": 2}
    kinds = list(makers)
    chosen = rng.choices(kinds, weights=[weights.get(kind, 1) for kind in kinds], k=STEPS)
    start = [["mkdir", "d", 0o755], ["mkdir", "d/g", 0o755]]
    return start + [[kind, *makers[kind]()] for kind in chosen]


@pytest.mark.parametrize(("seed", "user", "options"), CASES,
                         ids=[f"{seed}-{'nobody' if user else 'root'}{'-wb' if options else ''}"
                              for seed, user, options in CASES])
def test_random_program_gives_the_same_results_and_tree(
        seed: int, user: int, options: tuple[str, ...], public_dir: Path,
        mount_factory: Callable[..., Mount]) -> None:
    """Every step of a random program answers as on the backing store, and leaves
    the same tree (modes, owners, sizes, links, contents, xattrs)."""
    mount, ref = mount_with_reference(public_dir, mount_factory, *options)
    src = mount.src
    for root in (src, ref):
        os.chown(root, NOBODY, NOBODY)
    code = EXECUTOR.replace("PROGRAM_JSON", repr(json.dumps(program(seed))))
    through_mount = client(mount, code, user=user)
    plain = run_snippet(ref, code, user=user)
    for mine, theirs in zip(through_mount, plain, strict=True):
        assert mine == theirs, f"seed {seed}: through lockfs {mine}, plain directory {theirs}"
    assert tree(src) == tree(ref)
    failed = sum(str(row[-1]).startswith("errno ") for row in plain)
    assert 0 < failed < len(plain), "a program whose steps all fail (or all succeed) tests little"
