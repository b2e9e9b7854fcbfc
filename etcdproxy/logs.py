"""Per-process logging: stderr, with the role and pid on every line.

Every process (supervisor, hub, each worker) calls ``setup()`` once at start; a forked child calls
it again (through ``proc.child_init``) so its lines carry its own role. The pid comes from the log
record, so it is right after fork even before ``setup()`` runs again.
"""

from __future__ import annotations

import logging
import sys

# Marks the handler setup() installed, so a second call replaces it instead of doubling lines.
_HANDLER_NAME = "etcdproxy-stderr"
DATE_FORMAT = "%Y-%m-%d %H:%M:%S"


def format_string(role: str) -> str:
    """The line format for ``role``; ``%`` in a role is escaped so it cannot break formatting."""
    safe_role = role.replace("%", "%%")
    return f"%(asctime)s.%(msecs)03d {safe_role}[%(process)d] %(levelname)s %(name)s: %(message)s"


def setup(role: str, debug: bool) -> None:
    """Log to stderr at INFO (DEBUG with ``debug``), each line tagged ``role[pid]``.

    Idempotent: handlers installed by an earlier call (typically the supervisor's, inherited over
    fork) are removed first. Handlers installed by someone else are left alone.
    """
    root = logging.getLogger()
    for handler in list(root.handlers):
        if handler.get_name() == _HANDLER_NAME:
            root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(logging.Formatter(format_string(role), DATE_FORMAT))
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    # Warnings (DeprecationWarning from a library, ...) go through the same handler.
    logging.captureWarnings(True)
