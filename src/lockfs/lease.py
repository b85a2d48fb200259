"""The lease: which client may use the directory, as a pure state machine.

No I/O happens here, so every rule can be read and unit-tested without FUSE.
The guard (guard.py) feeds events in (a caller wants the lease, a handle was
opened or closed, a process exited) and does the I/O the answers call for
(take or drop the OFD lock, watch a process).

States:
    free  --grant(caller)-->  held(client, since, handles, processes)
    held  --last handle closed and (hold=open, or no tracked process alive)-->  free

A client is one mount namespace. While held, another client's request is
refused; the refusal is counted and remembered for ``lockfs status``.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable
from dataclasses import dataclass, field


class HoldMode(enum.Enum):
    """How long a client keeps the lease once it has it."""

    PROCESS = "process"  # while it has open handles or a process that used the mount lives
    OPEN = "open"  # exactly while it has open handles


@dataclass(frozen=True, slots=True)
class Client:
    """A mount namespace, named by the (st_dev, st_ino) of /proc/<pid>/ns/mnt."""

    ns_dev: int
    ns_ino: int

    def __str__(self) -> str:
        return f"mnt:[{self.ns_ino}]"


@dataclass(frozen=True, slots=True)
class Caller:
    """The process behind one request, as the daemon's PID namespace sees it."""

    tid: int
    tgid: int
    command: str
    client: Client
    kernel: bool = False  # a kernel thread (writeback flusher), not an application

    def __str__(self) -> str:
        return f"pid {self.tid} ({self.command}) in {self.client}"


@dataclass(frozen=True, slots=True)
class Refusal:
    """One refused request, kept for status."""

    who: str
    what: str
    reason: str
    at: float


@dataclass(frozen=True, slots=True)
class LeaseStatistics:
    """A snapshot of the lease for status output."""

    mode: str
    state: str  # "free" or "held"
    holder: str | None
    since: float | None
    processes: dict[int, str]
    handles: int
    refusals: int
    last_refusal: Refusal | None


class LeaseBusy(Exception):
    """The lease is held by another client; carries a sentence naming the holder."""


@dataclass(slots=True)
class _Holding:
    client: Client
    since: float
    handles: set[int] = field(default_factory=set)
    processes: dict[int, str] = field(default_factory=dict)


class Lease:
    """At most one client holds the directory; the rules of SPEC.md "The lease"."""

    def __init__(self, mode: HoldMode, clock: Callable[[], float] = time.time) -> None:
        self.mode = mode
        self._clock = clock
        self._held: _Holding | None = None
        self._refusals = 0
        self._last_refusal: Refusal | None = None

    # ----------------------------------------------------------- queries

    @property
    def holder(self) -> Client | None:
        return self._held.client if self._held else None

    @property
    def is_free(self) -> bool:
        return self._held is None

    def holder_description(self) -> str:
        """One phrase naming the holder, for refusal messages."""
        if self._held is None:
            return "nobody"
        pids = ",".join(str(pid) for pid in sorted(self._held.processes)) or "none alive"
        return (f"{self._held.client} (pids {pids}; since "
                f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(self._held.since))})")

    def statistics(self) -> LeaseStatistics:
        held = self._held
        return LeaseStatistics(
            mode=self.mode.value,
            state="held" if held else "free",
            holder=str(held.client) if held else None,
            since=held.since if held else None,
            processes=dict(held.processes) if held else {},
            handles=len(held.handles) if held else 0,
            refusals=self._refusals,
            last_refusal=self._last_refusal,
        )

    # ----------------------------------------------------------- transitions

    def check(self, caller: Caller) -> bool:
        """Whether ``caller`` may proceed; True means the lease is free and must be granted.

        Raises:
            LeaseBusy: another client holds the lease.
        """
        if self._held is None:
            return True
        if self._held.client != caller.client:
            raise LeaseBusy(f"held by {self.holder_description()}")
        return False

    def grant(self, caller: Caller) -> None:
        """Give the free lease to ``caller``'s client (after the OFD lock was taken)."""
        if self._held is not None:
            raise RuntimeError(f"lease granted to {caller.client} while held by "
                               f"{self._held.client}")
        self._held = _Holding(caller.client, self._clock())

    def note_process(self, caller: Caller) -> bool:
        """Record that the holder's process ``caller.tgid`` used the mount.

        Returns:
            True when the process is new and must be watched for its exit.
        """
        held = self._require_holder(caller.client)
        if self.mode is HoldMode.OPEN or caller.tgid in held.processes:
            return False
        held.processes[caller.tgid] = caller.command
        return True

    def handle_opened(self, client: Client, handle: int) -> None:
        self._require_holder(client).handles.add(handle)

    def handle_closed(self, handle: int) -> bool:
        """Forget ``handle``; True when that freed the lease."""
        if self._held is None or handle not in self._held.handles:
            return False
        self._held.handles.discard(handle)
        return self._release_if_unused()

    def process_exited(self, tgid: int) -> bool:
        """Forget process ``tgid``; True when that freed the lease."""
        if self._held is None or self._held.processes.pop(tgid, None) is None:
            return False
        return self._release_if_unused()

    def release_if_unused(self) -> bool:
        """Free the lease when nothing keeps it; True when it was freed now.

        Called after a request that took the lease without opening a handle
        (mkdir, unlink, ...): in hold=open mode that leaves the lease free.
        """
        if self._held is None:
            return False
        return self._release_if_unused()

    def abandon(self) -> tuple[Client | None, frozenset[int]]:
        """Drop the lease whatever holds it (the OFD lock was lost).

        Returns:
            The old holder and the handles it had open, which must be revoked.
        """
        held, self._held = self._held, None
        if held is None:
            return None, frozenset()
        return held.client, frozenset(held.handles)

    def refused(self, who: str, what: str, reason: str) -> Refusal:
        """Count one refused request and remember it as the latest."""
        self._refusals += 1
        self._last_refusal = Refusal(who, what, reason, self._clock())
        return self._last_refusal

    # ----------------------------------------------------------- internals

    def _require_holder(self, client: Client) -> _Holding:
        if self._held is None or self._held.client != client:
            raise RuntimeError(f"{client} acted as holder but the holder is "
                               f"{self.holder_description()}")
        return self._held

    def _release_if_unused(self) -> bool:
        held = self._held
        if held is None:
            return False
        if held.handles or (self.mode is HoldMode.PROCESS and held.processes):
            return False
        self._held = None
        return True
