"""The only bridge between the passthrough and the lease.

ops.py asks ``admit(ctx, what)`` before any request that needs the lease; the
guard identifies the caller (identity.py), asks the lease (lease.py), takes or
drops the OFD lock (lockfile.py) when the lease changes hands, and watches
the holder's processes (watch.py). Refusals become EBUSY, one log line each
(identical ones rate-limited, all counted).

Fail closed: a caller that cannot be identified is refused.

Concurrency: every decision runs on the trio thread without awaiting, so a
decision and the system call it allows are never interleaved with another
request's decision. The one exception is the periodic lock check, whose
system calls (which a network filesystem may block for seconds) run in a
worker thread; its answer is used only if the lease and the lockfile did not
change meanwhile.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import trio
from pyfuse3 import FUSEError, RequestContext

from lockfs.identity import Identities, UnknownCaller
from lockfs.lease import Caller, HoldMode, Lease, LeaseBusy
from lockfs.lockfile import LockFile
from lockfs.watch import ProcessWatcher

log = logging.getLogger(__name__)

REFUSAL_LOG_INTERVAL = 5.0  # seconds between two log lines for the same refusal
LOCK_CHECK_INTERVAL = 1.0  # seconds between two checks that a held OFD lock still stands


@dataclass(frozen=True)
class MountInfo:
    """What status reports about the mount itself."""

    source: str
    mountpoint: str
    lockfile: str


class Guard:
    """Decides, per request, whether the caller may use the directory."""

    def __init__(self, lease: Lease, identities: Identities, lockfile: LockFile,
                 info: MountInfo, hidden: set[tuple[tuple[int, int], bytes]]) -> None:
        self.lease = lease
        self.identities = identities
        self.lockfile = lockfile
        self.info = info
        self._hidden = hidden
        self._hidden_names = {name for _key, name in hidden}
        self._watcher: ProcessWatcher | None = None
        self._trio_token: trio.lowlevel.TrioToken | None = None
        self._last_logged: dict[tuple[str, str, str], float] = {}
        self._suppressed = 0
        # Set by mount.py: makes the given handles fail every further request.
        self.revoke: Callable[[frozenset[int]], None] = lambda handles: None
        # Set by mount.py: makes the kernel drop everything it cached of SRC.
        self.distrust_caches: Callable[[], None] = lambda: None
        # The lockfile counts every hold of every mount. The count this mount
        # last saw: if it differs at this mount's next hold, another mount held
        # SRC in between and may have written it. None: unknown (SRC was held
        # by another mount when this one started), which is treated the same.
        self._holds_seen: int | None = (
            None if lockfile.held_elsewhere() else _holds(lockfile.read_record()))

    def start(self, nursery: trio.Nursery) -> None:
        """Bind to the running trio loop (process watchers live in ``nursery``)."""
        self._watcher = ProcessWatcher(nursery, self._process_exited)
        self._trio_token = trio.lowlevel.current_trio_token()
        nursery.start_soon(self._watch_lock, name="lock check")

    def close(self) -> None:
        self.lease.abandon()
        self.lockfile.close()
        self.identities.forget_all()

    # ----------------------------------------------------------- Gate protocol

    def admit(self, ctx: RequestContext, what: str) -> Caller:
        try:
            caller = self.identities.resolve(ctx.pid)
        except UnknownCaller as exc:
            self._refuse(f"pid {ctx.pid}", None, what, str(exc))
        if caller.kernel and what == "setattr":
            # The kernel's writeback flusher updating the times of a file a
            # holder wrote: part of an admitted write, not a new user.
            return caller
        try:
            needs_grant = self.lease.check(caller)
        except LeaseBusy as exc:
            self._refuse(str(caller), caller, what, str(exc))
        if needs_grant:
            self._take(caller, what)
        if self.lease.note_process(caller) and not self._watch(caller.tgid):
            # Already gone: forget it once this request has run, not before.
            self._after_request(self._process_exited, caller.tgid)
        if self.lease.mode is HoldMode.OPEN:
            # A request that opened nothing (mkdir, or an open that failed)
            # leaves the lease free once it has run.
            self._after_request(self._release_if_unused)
        return caller

    def _after_request(self, callback: Callable[..., None], *args: object) -> None:
        """Run ``callback`` right after the current handler has returned."""
        if self._trio_token is not None:
            self._trio_token.run_sync_soon(callback, *args)

    def handle_opened(self, token: object, handle: int) -> None:
        if isinstance(token, Caller):
            self.lease.handle_opened(token.client, handle)

    def dir_handle_opened(self, ctx: RequestContext, handle: int) -> None:
        holder = self.lease.holder
        if holder is None:
            return
        try:
            caller = self.identities.resolve(ctx.pid)
        except UnknownCaller:
            return
        if caller.client == holder:
            self.lease.handle_opened(holder, handle)

    def handle_closed(self, handle: int) -> None:
        if self.lease.handle_closed(handle):
            self._drop("its last handle was closed")

    def is_hidden(self, parent_key: tuple[int, int], name: bytes) -> bool:
        return name in self._hidden_names and (parent_key, name) in self._hidden

    def status(self) -> bytes:
        return json.dumps(self.status_record(), sort_keys=True).encode()

    # ----------------------------------------------------------- status

    def status_record(self) -> dict[str, object]:
        stats = self.lease.statistics()
        if stats.state == "held":
            state = "held here"
        elif self.lockfile.held_elsewhere():
            state = "held by another mount"
        else:
            state = "free"
        record: dict[str, object] = {
            "mountpoint": self.info.mountpoint,
            "source": self.info.source,
            "lockfile": self.info.lockfile,
            "hold": stats.mode,
            "state": state,
            "holder": stats.holder,
            "since": stats.since,
            "processes": {str(pid): command for pid, command in sorted(stats.processes.items())},
            "open_handles": stats.handles,
            "refusals": stats.refusals,
            "last_refusal": asdict(stats.last_refusal) if stats.last_refusal else None,
            "daemon_pid": os.getpid(),
            "daemon_pid_namespace": os.stat("/proc/self/ns/pid").st_ino,
        }
        if state == "held by another mount":
            record["other_mount"] = self.lockfile.read_record()
        return record

    # ----------------------------------------------------------- internals

    def _take(self, caller: Caller, what: str) -> None:
        try:
            locked = self.lockfile.try_lock()
        except OSError as exc:
            # SRC removed, say: the caller gets the error itself (ENOENT), and
            # the log and status say why.
            reason = f"lockfile {self.info.lockfile} cannot be locked: {exc.strerror}"
            self.lease.refused(str(caller), what, reason)
            log.error("refused %s by %s: %s", what, caller, reason)
            raise FUSEError(exc.errno or errno.EIO) from None
        if not locked:
            other = self.lockfile.read_record() or {}
            where = (f"another lockfs mount (daemon pid {other.get('daemon_pid', '?')} on "
                     f"{other.get('host', '?')}, mountpoint {other.get('mountpoint', '?')})")
            self._refuse(str(caller), caller, what, f"lockfile {self.info.lockfile} is held by "
                         f"{where}")
        holds = _holds(self.lockfile.read_record())
        if holds != self._holds_seen:
            # Another mount may have written SRC since this one last held it:
            # nothing this mount's kernel has cached can be trusted any more.
            log.info("another mount held %s since this one last did: dropping cached "
                     "inodes", self.info.source)
            self.distrust_caches()
        self._holds_seen = holds + 1
        self.lease.grant(caller)
        self.lockfile.write_record({
            "host": socket.gethostname(), "daemon_pid": os.getpid(),
            "mountpoint": self.info.mountpoint, "holder": str(caller.client),
            "since": time.time(), "holds": holds + 1,
        })
        log.info("lease taken by %s for %s", caller, what)

    def _drop(self, why: str) -> None:
        log.info("lease released: %s", why)
        self._unlock()

    def _unlock(self) -> None:
        try:
            self.lockfile.unlock()
        except OSError as exc:
            log.warning("unlocking %s failed (%s): the lock was already gone",
                        self.info.lockfile, exc.strerror)

    async def _watch_lock(self) -> None:
        """Fence the holder when its OFD lock is lost (see LockFile.still_locked).

        There is no notification for a lost lock, so this checks once per
        LOCK_CHECK_INTERVAL, and only while the lease is held.
        """
        while True:
            await trio.sleep(LOCK_CHECK_INTERVAL)
            held = self.lease.statistics()
            if held.holder is None:
                continue
            opens = self.lockfile.opens
            # In a thread: on a network filesystem the query can block for
            # seconds, and the daemon must keep answering meanwhile.
            still = await trio.to_thread.run_sync(self.lockfile.still_locked)
            now = self.lease.statistics()
            unchanged = (now.holder, now.since) == (held.holder, held.since)
            if not still and unchanged and self.lockfile.opens == opens:
                self.fence(f"the OFD lock on {self.info.lockfile} was lost")

    def fence(self, why: str) -> None:
        """Drop the lease and revoke every handle its holder has open."""
        holder, handles = self.lease.abandon()
        self.revoke(handles)
        log.error("lease of %s fenced: %s; %d open handles revoked (further I/O on them "
                  "fails with EBADF)", holder, why, len(handles))
        self._unlock()

    def _release_if_unused(self) -> None:
        if self.lease.release_if_unused():
            self._drop("the request that took it opened nothing (hold=open)")

    def _watch(self, pid: int) -> bool:
        return self._watcher is not None and self._watcher.watch(pid)

    def _process_exited(self, pid: int) -> None:
        if self.lease.process_exited(pid):
            self._drop(f"the holder's last process {pid} exited")

    def _refuse(self, who: str, caller: Caller | None, what: str, reason: str):
        """Count, log (rate-limited) and raise EBUSY."""
        self.lease.refused(who, what, reason)
        key = (str(caller.client) if caller else who, what, reason)
        now = time.monotonic()
        if now - self._last_logged.get(key, -REFUSAL_LOG_INTERVAL) >= REFUSAL_LOG_INTERVAL:
            if len(self._last_logged) > 1024:
                self._last_logged.clear()
            self._last_logged[key] = now
            extra = f" ({self._suppressed} similar refusals not logged)" if self._suppressed else ""
            self._suppressed = 0
            log.warning("refused %s by %s: %s%s", what, who, reason, extra)
        else:
            self._suppressed += 1
        raise FUSEError(errno.EBUSY)


def _holds(record: dict[str, object] | None) -> int:
    """How many holds the lockfile has seen (0 for a new lockfile)."""
    holds = (record or {}).get("holds", 0)
    return holds if isinstance(holds, int) else -1
