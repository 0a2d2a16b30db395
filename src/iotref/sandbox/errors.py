"""The sandbox's own failure: one that stops it from starting and deserves one clear line
(``iotref sandbox: ...``), not a traceback. Components raise subclasses of it; the runner
prints it."""

from __future__ import annotations


class SandboxError(Exception):
    """A failure to start that deserves one clear line, not a traceback."""
