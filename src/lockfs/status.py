"""``lockfs status``: read the status record through the mount and render it.

The record travels as a virtual extended attribute of DST's root (see ops.py),
so status needs no socket and works from any namespace that sees DST, also
while another client holds the directory.
"""

from __future__ import annotations

import errno
import json
import os
import time

from lockfs.errors import NotMountedError
from lockfs.ops import STATUS_XATTR


def read_status(mountpoint: str) -> dict[str, object]:
    """The daemon's status record for the lockfs mount at ``mountpoint``."""
    try:
        data = os.getxattr(mountpoint, STATUS_XATTR)
    except OSError as exc:
        if exc.errno in (errno.ENOTCONN, errno.ECONNABORTED):
            raise NotMountedError(f"DST {mountpoint}: the lockfs daemon is gone (stale mount); "
                                  f"run 'lockfs unmount {mountpoint}'") from None
        if exc.errno in (errno.ENODATA, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise NotMountedError(f"DST {mountpoint}: is not a lockfs mount") from None
        if exc.errno == errno.ENOENT:
            raise NotMountedError(f"DST {mountpoint}: does not exist") from None
        raise NotMountedError(f"DST {mountpoint}: {exc.strerror}") from None
    return json.loads(data)


def render_text(record: dict[str, object]) -> str:
    """Human-readable status, one fact per line."""
    lines = [
        f"mountpoint:   {record['mountpoint']}",
        f"source:       {record['source']}",
        f"lockfile:     {record['lockfile']}",
        f"hold mode:    {record['hold']}",
        f"state:        {record['state']}",
    ]
    if record.get("holder"):
        processes = record.get("processes") or {}
        named = ", ".join(f"{pid} ({cmd})" for pid, cmd in processes.items()) or "none alive"
        lines += [
            f"holder:       {record['holder']}",
            f"since:        {_when(record.get('since'))}",
            f"processes:    {named}",
        ]
    other = record.get("other_mount")
    if isinstance(other, dict):
        lines.append(f"held by:      daemon pid {other.get('daemon_pid')} on {other.get('host')}, "
                     f"mountpoint {other.get('mountpoint')}, client {other.get('holder')}, "
                     f"since {_when(other.get('since'))}")
    lines.append(f"open handles: {record['open_handles']}")
    lines.append(f"refusals:     {record['refusals']}")
    last = record.get("last_refusal")
    if isinstance(last, dict):
        lines.append(f"last refused: {last['what']} by {last['who']} at {_when(last['at'])}: "
                     f"{last['reason']}")
    namespace = record.get("daemon_pid_namespace")
    elsewhere = namespace is not None and namespace != os.stat("/proc/self/ns/pid").st_ino
    lines.append(f"daemon pid:   {record.get('daemon_pid')}"
                 + (" (in another PID namespace)" if elsewhere else ""))
    return "\n".join(lines)


def _when(stamp: object) -> str:
    if not isinstance(stamp, (int, float)):
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(stamp))
