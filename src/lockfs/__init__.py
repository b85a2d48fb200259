"""lockfs: a FUSE passthrough that lets one client at a time use a data directory."""

__version__ = "0.1.0"
