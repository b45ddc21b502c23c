"""Errors a user can act on.

Every error raised for bad input derives from :class:`EdgeEnsembleError`; its message is one line that says
what is wrong and what to do. The CLI prints that line and exits non-zero, never a traceback.
"""

from __future__ import annotations


class EdgeEnsembleError(Exception):
    """Base class: a problem the user can fix, described in one line."""

    exit_code = 1


class UsageError(EdgeEnsembleError):
    """Invalid options or arguments (exit code 2, like click's own usage errors)."""

    exit_code = 2


class ModelSourceError(EdgeEnsembleError):
    """A model could not be found, fetched, assembled or verified."""


class ModelLoadError(EdgeEnsembleError):
    """A file exists but llama.cpp cannot use it (not GGUF, truncated, unsupported memory, too large)."""


class IncompatibleMembersError(EdgeEnsembleError):
    """Members that cannot be combined into one ensemble (the message says why)."""


class LlamaCrashError(EdgeEnsembleError):
    """llama.cpp crashed in a child process (``edge-ensemble doctor``): exit 3, so scripts can tell a build to
    redo from a missing model or a bad file (exit 1)."""

    exit_code = 3


class HeadFileError(EdgeEnsembleError):
    """A route head file that is missing, corrupt, or made for other models (the fix: `route train`)."""


class ContextOverflowError(EdgeEnsembleError):
    """A prompt does not fit in a member's context window."""


class BusyError(UsageError):
    """An ensemble asked for a second answer by the thread whose first answer is still streaming (exit 2)."""


class EdgeEnsembleWarning(UserWarning):
    """A problem that was worked around (the message says what was done and how to avoid it), one line.

    The library reports these with :func:`warnings.warn`; the CLI prints each as ``warning: ...`` on stderr.
    """


def warn(message: str) -> None:
    """Report a worked-around problem as an :class:`EdgeEnsembleWarning` (pointing at the caller's caller)."""
    import warnings

    warnings.warn(EdgeEnsembleWarning(message), stacklevel=3)


class Cancelled(Exception):
    """An answer decoded together with others (``eval --parallel``) stopped early because the run is ending
    (Ctrl-C, another answer's error). Not an :class:`EdgeEnsembleError`: nothing for the user to fix."""
