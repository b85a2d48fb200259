"""Where the daemon's log lines go: stderr in the foreground, else a file or syslog."""

from __future__ import annotations

import logging
import logging.handlers
import os
import sys

FORMAT = "%(asctime)s lockfs[%(process)d] %(levelname)s %(name)s: %(message)s"
SYSLOG_FORMAT = "lockfs[%(process)d]: %(levelname)s %(name)s: %(message)s"


def setup_logging(*, foreground: bool, debug: bool, log_file: str | None) -> str:
    """Configure the root logger; returns a phrase saying where logs go."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler: logging.Handler
    if log_file:
        handler = logging.FileHandler(log_file)
        handler.setFormatter(logging.Formatter(FORMAT))
        where = log_file
    elif foreground:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(FORMAT))
        where = "stderr"
    elif os.path.exists("/dev/log"):
        handler = logging.handlers.SysLogHandler("/dev/log")
        handler.setFormatter(logging.Formatter(SYSLOG_FORMAT))
        where = "syslog"
    else:
        os.makedirs("/var/log/lockfs", exist_ok=True)
        where = "/var/log/lockfs/lockfs.log"
        handler = logging.FileHandler(where)
        handler.setFormatter(logging.Formatter(FORMAT))
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    if not debug:
        logging.getLogger("pyfuse3").setLevel(logging.WARNING)
    return where
