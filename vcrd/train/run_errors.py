"""The failures of ``vcrd train`` that carry their exit code (2: refused before any work, 1: failed during it)."""

from __future__ import annotations


class RunError(RuntimeError):
    """A ``vcrd train`` failure with its exit code (2: refused before any work, 1: failed during it)."""

    exit_code = 1


class RunLockedError(RunError):
    """Another run holds the output folder's lock: refused before any work."""

    exit_code = 2


class ResumeError(RunError):
    """``--resume`` found no checkpoint to continue from, or one that does not match: refused before any work."""

    exit_code = 2


class CheckpointWriteError(RunError):
    """A checkpoint or the final model could not be written: failed during the run."""

    exit_code = 1


__all__ = ["CheckpointWriteError", "ResumeError", "RunError", "RunLockedError"]
