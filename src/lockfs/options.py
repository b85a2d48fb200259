"""Mount options: command-line flags and ``-o a,b=c`` lists parsed into one frozen record.

Options are sorted into three kinds: lockfs's own (``hold``, ``lockfile``,
``log_file``, ``debug``), options handed to libfuse and the kernel, and options
that only mount(8) acts on (``defaults``, ``noauto``, ``x-systemd.*``...),
which are accepted and dropped so that an fstab line works unchanged.
Anything else is refused by name.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lockfs.errors import UsageError
from lockfs.lease import HoldMode

DEFAULT_LOCKFILE_NAME = ".lockfs-lease"

# Handed to libfuse as they are (mount flags and FUSE session options).
FUSE_FLAGS = frozenset({
    "ro", "rw", "suid", "nosuid", "dev", "nodev", "exec", "noexec", "async", "sync",
    "dirsync", "atime", "noatime",
    "allow_other", "allow_root", "default_permissions",
})
FUSE_VALUED = frozenset({"fsname", "subtype"})
# libfuse options that cannot work here, refused by name with the reason.
NOT_SUPPORTED = {
    "max_read": "pyfuse3 asks the kernel for its own maximum read size; the session fails",
    "blksize": "it is only for block-device (fuseblk) mounts",
}
# Meaningful to mount(8) or systemd only.
MOUNT8_ONLY = frozenset({
    "defaults", "auto", "noauto", "user", "nouser", "users", "owner", "group", "nofail",
    "_netdev", "loop", "lazytime", "nolazytime", "iversion", "noiversion",
    # libfuse refuses these; access times follow the backing store anyway.
    "relatime", "norelatime", "strictatime", "nostrictatime", "nodiratime", "diratime",
})
OWN_FLAGS = frozenset({"debug", "foreground", "writeback_cache"})
OWN_VALUED = frozenset({"hold", "lockfile", "log_file", "log-file"})
# The two flags whose opposite the user may ask for (dev, suid) override the default.
OPPOSITES = {"suid": "nosuid", "dev": "nodev"}


@dataclass(frozen=True)
class MountOptions:
    """Everything ``lockfs mount`` was asked to do."""

    source: str
    mountpoint: str
    foreground: bool = False
    debug: bool = False
    hold: HoldMode = HoldMode.PROCESS
    lockfile: str | None = None
    log_file: str | None = None
    writeback_cache: bool = False
    fuse_options: frozenset[str] = field(default_factory=frozenset)

    def libfuse_options(self) -> set[str]:
        """The option set given to pyfuse3.init: container-volume defaults plus the user's."""
        options = {"allow_other", "default_permissions", "nosuid", "nodev",
                   f"fsname=lockfs:{_escape(self.source)}", "subtype=lockfs"}
        for option in self.fuse_options:
            if option in OPPOSITES:
                options.discard(OPPOSITES[option])
            elif option.startswith(("fsname=", "subtype=")):
                options = {o for o in options if not o.startswith(option.split("=")[0] + "=")}
            if option != "rw":
                # suid/dev are passed on: libfuse mounts nosuid,nodev unless told.
                options.add(option)
        return options


def parse_option_list(values: list[str]) -> dict[str, str | None]:
    """Split repeated ``-o a,b=c`` arguments into an ordered {name: value} map."""
    parsed: dict[str, str | None] = {}
    for value in values:
        for item in value.split(","):
            item = item.strip()
            if not item:
                continue
            name, sep, rest = item.partition("=")
            parsed[name] = rest if sep else None
    return parsed


def build_options(source: str, mountpoint: str, option_lists: list[str], *,
                  foreground: bool = False, debug: bool = False, hold: str | None = None,
                  lockfile: str | None = None, log_file: str | None = None,
                  mount8: bool = False) -> MountOptions:
    """Merge flags and ``-o`` lists; flags given explicitly win.

    ``mount8``: the options come from mount(8)/mount.fuse3, which spell out
    ``dev,suid`` for every fstab line that does not say nodev/nosuid
    ("defaults" included). There they are ignored: a lockfs mount from fstab
    is always nosuid,nodev, as a container volume source should be.

    Raises:
        UsageError: an unknown option, a missing value, or a bad hold mode.
    """
    fuse: set[str] = set()
    own: dict[str, str | None] = {}
    for name, value in parse_option_list(option_lists).items():
        if mount8 and name in OPPOSITES:
            continue
        if name in OWN_VALUED:
            if not value:
                raise UsageError(f"option '{name}' needs a value ({name}=...)")
            own[name.replace("-", "_")] = value
        elif name in OWN_FLAGS:
            own[name] = "1"
        elif name in FUSE_FLAGS and value is None:
            fuse.add(name)
        elif name in NOT_SUPPORTED:
            raise UsageError(f"mount option '{name}' is not supported: {NOT_SUPPORTED[name]}")
        elif name in FUSE_VALUED and value:
            fuse.add(f"{name}={value}")
        elif name in MOUNT8_ONLY or name.startswith(("x-", "comment=")) or name == "comment":
            continue
        elif name == "remount":
            raise UsageError("remount is not supported: unmount and mount again")
        else:
            raise UsageError(f"unknown mount option '{name}{'=' + value if value else ''}'")
    hold_name = hold or own.get("hold") or HoldMode.PROCESS.value
    try:
        hold_mode = HoldMode(hold_name)
    except ValueError:
        raise UsageError(f"hold mode '{hold_name}' is not one of: process, open") from None
    return MountOptions(
        source=source,
        mountpoint=mountpoint,
        foreground=foreground or "foreground" in own,
        debug=debug or "debug" in own,
        hold=hold_mode,
        lockfile=lockfile or own.get("lockfile"),
        log_file=log_file or own.get("log_file"),
        writeback_cache="writeback_cache" in own,
        fuse_options=frozenset(fuse),
    )


def _escape(path: str) -> str:
    """fsname cannot carry commas or backslashes through libfuse's option parser."""
    return path.replace("\\", "\\\\").replace(",", "\\,")
