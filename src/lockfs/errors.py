"""Errors the command line reports as one line, each kind with its own exit code."""

from __future__ import annotations


class LockfsError(Exception):
    """A refusal with a message for the user; ``code`` is the process exit status."""

    code = 1


class UsageError(LockfsError):
    code = 2


class BadPathError(LockfsError):
    """SRC or DST cannot be used as given."""

    code = 3


class FuseUnavailableError(LockfsError):
    """No /dev/fuse, no privilege to mount, or libfuse refused."""

    code = 4


class LockfileUnusableError(LockfsError):
    code = 5


class AlreadyMountedError(LockfsError):
    code = 6


class NotMountedError(LockfsError):
    code = 7
