"""The ``lockfs`` command: mount, unmount, status, and the mount(8) form.

Every failure the user can cause prints one line on stderr and exits non-zero
with a code per kind (errors.py); tracebacks are kept for real bugs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import NoReturn

from lockfs.errors import LockfsError, NotMountedError, UsageError

SUBCOMMANDS = ("mount", "unmount", "umount", "status")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see 'lockfs --help')")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="lockfs", description=(
        "A FUSE passthrough of SRC at DST that lets only one client (mount namespace) "
        "use the directory at a time. Also callable by mount(8) as 'lockfs SRC DST -o opts'."))
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    mount = commands.add_parser("mount", help="mount SRC at DST and return once it answers")
    _add_mount_arguments(mount)
    for name in ("unmount", "umount"):
        unmount = commands.add_parser(name, help="unmount DST and wait for its daemon")
        unmount.add_argument("mountpoint", metavar="DST")
    status = commands.add_parser("status", help="show who holds DST")
    status.add_argument("mountpoint", metavar="DST")
    status.add_argument("--json", action="store_true", help="print the raw JSON record")
    return parser


def _add_mount_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", metavar="SRC")
    parser.add_argument("mountpoint", metavar="DST")
    parser.add_argument("-o", dest="options", action="append", default=[],
                        metavar="OPT[,OPT...]",
                        help="mount options: hold=process|open, lockfile=PATH, log_file=PATH, "
                             "writeback_cache, ro, suid, dev, and the mount(8) options of an "
                             "fstab line")
    parser.add_argument("-f", "--foreground", action="store_true",
                        help="stay attached and log to stderr (systemd, containers)")
    parser.add_argument("-d", "--debug", action="store_true", help="log every decision")
    parser.add_argument("--hold", choices=("process", "open"),
                        help="keep the lease while the holder's processes live (process, "
                             "default) or only while it has files open (open)")
    parser.add_argument("--lockfile", metavar="PATH",
                        help="the lockfile (default: SRC/.lockfs-lease, hidden in the mount)")
    parser.add_argument("--log-file", metavar="PATH", help="log here instead of syslog")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return _dispatch(argv)
    except LockfsError as exc:
        print(f"lockfs: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        return 130


def _dispatch(argv: list[str]) -> int:
    if argv and argv[0] not in SUBCOMMANDS and not argv[0].startswith("-"):
        # mount(8) / mount.fuse3 form: lockfs SRC DST -o opts
        form = _Parser(prog="lockfs SRC DST")
        _add_mount_arguments(form)
        args = form.parse_args(argv)
        return _mount(args, mount8=True)
    args = _parser().parse_args(argv)
    if args.command == "mount":
        return _mount(args)
    if args.command in ("unmount", "umount"):
        return unmount(args.mountpoint)
    return _status(args.mountpoint, as_json=args.json)


def _mount(args: argparse.Namespace, *, mount8: bool = False) -> int:
    from lockfs.mount import run_mount
    from lockfs.options import build_options

    options = build_options(args.source, args.mountpoint, args.options,
                            foreground=args.foreground, debug=args.debug, hold=args.hold,
                            lockfile=args.lockfile, log_file=args.log_file, mount8=mount8)
    return run_mount(options)


def _status(mountpoint: str, *, as_json: bool) -> int:
    from lockfs.status import read_status, render_text

    record = read_status(mountpoint)
    print(json.dumps(record, indent=2, sort_keys=True) if as_json else render_text(record))
    return 0


def unmount(mountpoint: str, timeout: float = 30.0) -> int:
    """Unmount DST; wait until its daemon has exited (so its lock is gone)."""
    from lockfs.checks import mount_type
    from lockfs.status import read_status

    path = os.path.realpath(mountpoint)
    kind = mount_type(path)
    if kind is None:
        raise NotMountedError(f"DST {mountpoint}: is not mounted")
    if kind != "fuse.lockfs":
        raise NotMountedError(f"DST {mountpoint}: is a {kind} mount, not lockfs")
    try:
        daemon_pid = _daemon_pid_here(read_status(path))
    except (NotMountedError, ValueError):
        daemon_pid = 0
    command = ["umount", path] if os.geteuid() == 0 else ["fusermount3", "-u", path]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        message = result.stderr.strip().splitlines()[-1] if result.stderr.strip() else "failed"
        raise LockfsError(f"DST {mountpoint}: unmount refused: {message}")
    deadline = time.monotonic() + timeout
    while daemon_pid and time.monotonic() < deadline and process_alive(daemon_pid):
        time.sleep(0.02)
    return 0


def _daemon_pid_here(record: dict[str, object]) -> int:
    """The daemon's pid as this PID namespace sees it (0 if it cannot be seen).

    The status record gives the pid in the daemon's own PID namespace; when
    that is another namespace (a daemon in a container), the process is found
    by its namespace and its innermost pid (NSpid in /proc/PID/status).
    """
    pid = int(record.get("daemon_pid") or 0)  # type: ignore[call-overload]
    namespace = record.get("daemon_pid_namespace")
    if namespace is None or namespace == os.stat("/proc/self/ns/pid").st_ino:
        return pid
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if os.stat(f"/proc/{entry}/ns/pid").st_ino != namespace:
                continue
            with open(f"/proc/{entry}/status") as status:
                nspid = next(line for line in status if line.startswith("NSpid:"))
        except (OSError, StopIteration):
            continue
        if nspid.split()[-1] == str(pid):
            return int(entry)
    return 0


def process_alive(pid: int) -> bool:
    """Whether ``pid`` runs and is not a zombie (for waiting on a daemon we did not fork)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


if __name__ == "__main__":
    sys.exit(main())
