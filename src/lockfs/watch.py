"""Wakes the lease when a holder's process exits: one pidfd and one trio task each.

Why pidfds: no polling loop, no PID-reuse mistakes; the kernel makes a pidfd
readable when its process exits, and trio's wait_readable sleeps on it.

Concurrency: ``watch`` is called on the trio thread; each watcher task owns its
pidfd and closes it, also when cancelled at shutdown.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

import trio

log = logging.getLogger(__name__)


class ProcessWatcher:
    """Calls ``on_exit(pid)`` once for each watched process, when it exits."""

    def __init__(self, nursery: trio.Nursery, on_exit: Callable[[int], None]) -> None:
        self._nursery = nursery
        self._on_exit = on_exit
        self._watched: set[int] = set()

    def watch(self, pid: int) -> bool:
        """Start watching process ``pid``; False when it has already gone."""
        if pid in self._watched:
            return True
        try:
            pidfd = os.pidfd_open(pid, 0)
        except ProcessLookupError:
            return False
        self._watched.add(pid)
        self._nursery.start_soon(self._wait_for_exit, pid, pidfd, name=f"watch pid {pid}")
        return True

    def __len__(self) -> int:
        return len(self._watched)

    async def _wait_for_exit(self, pid: int, pidfd: int) -> None:
        try:
            await trio.lowlevel.wait_readable(pidfd)
        finally:
            os.close(pidfd)
            self._watched.discard(pid)
        try:
            self._on_exit(pid)
        except Exception:
            log.exception("handling the exit of pid %d failed", pid)
