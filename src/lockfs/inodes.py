"""The inode table: FUSE inode numbers mapped to O_PATH descriptors of backing objects.

Why descriptors and not paths: a path rebuilt from names can be redirected by a
concurrent rename or a symlink swapped into the backing tree, and then an
operation lands outside SRC. Every object the kernel knows about is held here
by one ``O_PATH | O_NOFOLLOW`` descriptor, and every operation is an ``*at()``
call relative to such a descriptor, so nothing is ever resolved by path.

Inode numbers: objects on SRC's own filesystem keep their backing st_ino (so
``ls -i``, hard-link detection and tar behave as on the backing store), with
SRC's root swapped with FUSE's root number 1. Objects on another filesystem
(a mount point inside SRC, or an overlayfs layer that reports its own st_dev)
are served too, with numbers from a private range above 2**63 so that they
never collide with SRC's: each foreign st_dev gets the next of 2**15 slots of
2**48 numbers, and an object's number is its slot plus its st_ino. So a
foreign object keeps its number after the kernel forgot it (``ls -i``, tar
and du see stable numbers), at the cost of one dict entry per foreign
filesystem. An object whose st_ino does not fit in 48 bits (or a 32768th
filesystem) gets a number counted out of the last slot, stable only while
the kernel knows the object.

Retiring (``retire``): after another lockfs mount of the same SRC held the
lockfile, nothing this mount's kernel cached can be trusted; with the
writeback cache the kernel even keeps its own file sizes whatever getattr
says. So every entry is retired: a request naming a retired inode gets ESTALE,
which makes the VFS walk the path again with revalidation, and lookups then
hand out fresh numbers (from a range above 2**62), i.e. new kernel inodes with
empty caches. Retired entries live on until the kernel forgets them.

Descriptor budget: one descriptor per known inode would cap the mount at the
process's RLIMIT_NOFILE (20,000 on some machines, and not always raisable).
So each object on SRC's filesystem also keeps its file handle
(name_to_handle_at), and only the ``fd_budget`` most recently used entries
keep their descriptor open; a colder one is closed and reopened from its
handle (open_by_handle_at, which resolves no path) when next used. Objects
whose filesystem cannot export handles keep their descriptor.

Lookup counts follow the kernel's: every reply that hands out an entry adds
one, ``forget`` subtracts, and the descriptor is closed at zero. A forget for
more than the table holds is logged and clamped, never raised: an exception
would end the daemon.

Concurrency: all calls run on the trio thread and never await, so no lock.
"""

from __future__ import annotations

import errno
import logging
import os
from collections import OrderedDict
from dataclasses import dataclass

import pyfuse3

from lockfs import syscalls

log = logging.getLogger(__name__)

ROOT_INODE: int = pyfuse3.ROOT_INODE
FOREIGN_BASE = 1 << 63
FOREIGN_SLOT_BITS = 48
FOREIGN_OVERFLOW_SLOT = (1 << (63 - FOREIGN_SLOT_BITS)) - 1
FRESH_BASE = 1 << 62  # numbers handed out after a retire
FRESH_GENERATIONS = (1 << (62 - FOREIGN_SLOT_BITS)) - 1  # generation fields above 0

BackingKey = tuple[int, int]  # (st_dev, st_ino)


@dataclass(slots=True, eq=False)
class Inode:
    """One backing object the kernel knows: its descriptor and lookup count."""

    ino: int
    key: BackingKey
    fd: int  # O_PATH descriptor, -1 while closed to save descriptors (see ``handle``)
    nlookup: int = 0
    is_dir: bool = False
    generation: int = 0  # the table's generation when this entry was made
    handle: bytes | None = None  # file handle to reopen ``fd`` from; None: fd stays open
    direct_io_seen: bool = False  # ever opened with O_DIRECT (ops.py: no kept page cache)


class InodeTable:
    """Owns every O_PATH descriptor of the mount; closes them when forgotten."""

    def __init__(self, root_fd: int, fd_budget: int = 1 << 20) -> None:
        st = os.fstat(root_fd)
        # open_by_handle_at wants a real (not O_PATH) descriptor on the filesystem.
        self._mount_fd = os.open(f"/proc/self/fd/{root_fd}",
                                 os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self._fd_budget = max(64, fd_budget)
        self._open_lru: OrderedDict[int, Inode] = OrderedDict()  # entries that can close
        self._peak = 0  # the most entries held since the dicts were last compacted
        self.root_key: BackingKey = (st.st_dev, st.st_ino)
        self.root_dev = st.st_dev
        self._by_ino: dict[int, Inode] = {}
        self._by_key: dict[BackingKey, Inode] = {}
        self._foreign_slots: dict[int, int] = {}  # st_dev -> slot, for the mount's life
        self._foreign: dict[BackingKey, int] = {}  # overflow numbers of known objects
        self._next_foreign = FOREIGN_BASE | (FOREIGN_OVERFLOW_SLOT << FOREIGN_SLOT_BITS)
        self.generation = 0
        self._fresh: dict[BackingKey, int] = {}
        self._next_fresh = FRESH_BASE
        self._root = Inode(ROOT_INODE, self.root_key, root_fd, nlookup=1, is_dir=True)
        self._by_ino[ROOT_INODE] = self._root
        self._by_key[self.root_key] = self._root

    def __len__(self) -> int:
        return len(self._by_ino)

    def ino_for(self, key: BackingKey) -> int:
        """The FUSE inode number for a backing object (stable while it is known)."""
        if self.generation and key != self.root_key:
            # After a retire, numbers are the generation's range plus the usual
            # number, so that an object keeps its number (across renames, and
            # after the kernel forgot it) as st_ino does on the backing store.
            usual = self._usual_number(key)
            field = (self.generation - 1) % FRESH_GENERATIONS + 1
            number = FRESH_BASE | (field << FOREIGN_SLOT_BITS) | usual
            known = self._by_ino.get(number)
            if usual < 1 << FOREIGN_SLOT_BITS and (known is None or (
                    known.key == key and known.generation == self.generation)):
                return number
            number = self._fresh.get(key)
            if number is None:
                number = self._fresh[key] = self._next_fresh
                self._next_fresh += 1
            return number
        return self._usual_number(key)

    def _usual_number(self, key: BackingKey) -> int:
        """The number of ``key`` while no retire happened (see the module docstring)."""
        dev, ino = key
        if dev == self.root_dev:
            if key == self.root_key:
                return ROOT_INODE
            if ino == ROOT_INODE:
                return self.root_key[1]
            return ino
        slot = self._foreign_slots.get(dev)
        if slot is None and len(self._foreign_slots) < FOREIGN_OVERFLOW_SLOT:
            slot = self._foreign_slots[dev] = len(self._foreign_slots)
        if slot is not None and ino < 1 << FOREIGN_SLOT_BITS:
            return FOREIGN_BASE | (slot << FOREIGN_SLOT_BITS) | ino
        number = self._foreign.get(key)
        if number is None:
            number = self._next_foreign
            self._next_foreign += 1
            self._foreign[key] = number
        return number

    def get(self, ino: int) -> Inode:
        """The entry for ``ino``; ESTALE if the kernel names one we do not hold."""
        try:
            entry = self._by_ino[ino]
        except KeyError:
            log.error("internal error: request for unknown inode %d", ino)
            raise pyfuse3.FUSEError(errno.ESTALE) from None
        if entry.generation != self.generation:
            raise pyfuse3.FUSEError(errno.ESTALE)  # retired: the kernel looks it up again
        if entry.handle is not None:
            self.touch(entry)
        return entry

    def touch(self, entry: Inode) -> None:
        """Make sure ``entry.fd`` is open, and count it as just used."""
        if entry.fd < 0:
            try:
                entry.fd = syscalls.open_handle(self._mount_fd, entry.handle or b"",
                                                os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
            except OSError as exc:
                raise pyfuse3.FUSEError(errno.ESTALE if exc.errno != errno.EMFILE
                                        else errno.EMFILE) from None
            self._open_lru[entry.ino] = entry
            self._close_coldest(keep=entry)
        else:
            self._open_lru.move_to_end(entry.ino)

    def _close_coldest(self, keep: Inode) -> None:
        while len(self._open_lru) > self._fd_budget:
            ino, cold = next(iter(self._open_lru.items()))
            if cold is keep:
                return
            del self._open_lru[ino]
            os.close(cold.fd)
            cold.fd = -1

    def retire(self) -> int:
        """Retire every entry but the root (see the module docstring); returns how many."""
        self.generation += 1
        self._root.generation = self.generation
        self._fresh.clear()
        self._by_key = {self.root_key: self._root}
        return len(self._by_ino) - 1

    def inode_numbers(self) -> list[int]:
        return list(self._by_ino)

    def find(self, key: BackingKey) -> Inode | None:
        return self._by_key.get(key)

    def remember(self, fd: int, st: os.stat_result) -> Inode:
        """Count one more kernel reference to the object open as ``fd``.

        Takes ownership of ``fd``: it is kept for a new object and closed when
        the object was already known (the known descriptor stays authoritative).
        """
        key = (st.st_dev, st.st_ino)
        known = self._by_key.get(key)
        if known is not None:
            known.nlookup += 1
            if known.fd < 0:  # closed to save descriptors: adopt this one
                known.fd = fd
                # With no descriptor holding it, the old object may have been
                # deleted in SRC and its number reused by this one: reopen from
                # now on by this object's handle, not the old one's.
                known.handle = self._handle(fd, st)
                self._open_lru[known.ino] = known
                self._close_coldest(keep=known)
            else:
                os.close(fd)
                if known.handle is not None:
                    self._open_lru.move_to_end(known.ino)
            return known
        entry = Inode(self.ino_for(key), key, fd, nlookup=1, is_dir=_is_dir(st.st_mode),
                      generation=self.generation, handle=self._handle(fd, st))
        self._by_ino[entry.ino] = entry
        self._by_key[key] = entry
        self._peak = max(self._peak, len(self._by_ino))
        if entry.handle is not None:
            self._open_lru[entry.ino] = entry
            self._close_coldest(keep=entry)
        return entry

    def _handle(self, fd: int, st: os.stat_result) -> bytes | None:
        if st.st_dev != self.root_dev:
            return None  # another filesystem: its own mount descriptor would be needed
        try:
            return syscalls.handle_of(fd)
        except OSError:
            return None  # cannot export handles: the descriptor stays open

    def add_reference(self, entry: Inode) -> None:
        entry.nlookup += 1

    def forget(self, ino: int, count: int) -> None:
        """Drop ``count`` kernel references; close the descriptor at zero."""
        entry = self._by_ino.get(ino)
        if entry is None or ino == ROOT_INODE:
            return
        if count > entry.nlookup:
            log.error("internal error: forget %d of inode %d that has %d lookups",
                      count, ino, entry.nlookup)
            count = entry.nlookup
        entry.nlookup -= count
        if entry.nlookup == 0:
            del self._by_ino[ino]
            if self._by_key.get(entry.key) is entry:
                del self._by_key[entry.key]
                self._foreign.pop(entry.key, None)
                self._fresh.pop(entry.key, None)
            self._open_lru.pop(ino, None)
            if entry.fd >= 0:
                os.close(entry.fd)
            if self._peak > 4096 and len(self._by_ino) < self._peak // 4:
                self._compact()

    def _compact(self) -> None:
        """Rebuild the dicts: Python's never shrink, and memory should come back
        once the kernel forgot most inodes (200,000 entries cost ~30 MiB of dicts)."""
        self._by_ino = dict(self._by_ino)
        self._by_key = dict(self._by_key)
        self._open_lru = OrderedDict(self._open_lru)
        self._fresh = dict(self._fresh)
        self._foreign = dict(self._foreign)
        self._peak = len(self._by_ino)

    def open_descriptors(self) -> int:
        """How many O_PATH descriptors the table holds open now."""
        return sum(1 for entry in self._by_ino.values() if entry.fd >= 0)

    def close_all(self) -> None:
        for entry in self._by_ino.values():
            if entry.fd >= 0:
                os.close(entry.fd)
        self._by_ino.clear()
        self._by_key.clear()
        self._open_lru.clear()
        os.close(self._mount_fd)


def _is_dir(mode: int) -> bool:
    return (mode & 0o170000) == 0o040000
