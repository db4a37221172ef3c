"""The errors granet reports to its users.

Everything a user can cause — a bad value, a missing or corrupt file, a full disk, a stopped peer
process — is raised as a :class:`GranetError` whose message is one line naming the value or file and
what to do. The ``granet`` command prints such an error as ``granet: error: <message>`` and exits with
status 2; any other exception is a bug and keeps its traceback.
"""
from __future__ import annotations

from typing import Optional


class GranetError(Exception):
    """A problem the user must fix, described in one line."""


class ConfigError(GranetError, ValueError):
    """An invalid configuration value, flag or combination of values."""


class CheckpointError(GranetError):
    """A checkpoint or model file that cannot be read, is refused, or belongs to another run."""


class RunDirError(GranetError):
    """A run directory that cannot be created, written or reused."""


class PeerFailure(GranetError):
    """Another process of a ``torchrun`` job died or stopped responding (a collective timed out)."""


class Interrupted(KeyboardInterrupt):
    """Training was stopped by SIGINT (Ctrl-C) or SIGTERM.

    A subclass of :class:`KeyboardInterrupt` so that code which already handles Ctrl-C handles both.

    Attributes:
        signal_name: ``"SIGINT"`` or ``"SIGTERM"``.
        run_dir: the run directory, when known.
        checkpoint_epoch: the epoch of the last complete checkpoint, or ``None`` if there is none.
    """

    def __init__(self, signal_name: str, run_dir: Optional[str] = None, checkpoint_epoch: Optional[int] = None):
        super().__init__(signal_name)
        self.signal_name = signal_name
        self.run_dir = run_dir
        self.checkpoint_epoch = checkpoint_epoch

    @property
    def exit_code(self) -> int:
        """The conventional shell status: 128 + the signal number."""
        return 143 if self.signal_name == "SIGTERM" else 130

    def message(self) -> str:
        """What happened and how to continue, in one line."""
        where = self.run_dir or "the run directory"
        if self.checkpoint_epoch is None:
            return (f"interrupted by {self.signal_name} before the first epoch ended; nothing was checkpointed: "
                    f"`granet train --resume {where}` starts the run again from the beginning")
        return (f"interrupted by {self.signal_name}; epoch {self.checkpoint_epoch} is checkpointed in {where}: "
                f"continue with `granet train --resume {where}`")


__all__ = ["GranetError", "ConfigError", "CheckpointError", "RunDirError", "PeerFailure", "Interrupted", "short_text",
           "short_repr", "install_hint"]


def install_hint(extra: str, package: Optional[str] = None) -> str:
    """How to install an optional dependency group of granet, for messages and docstrings.

    granet is installed from its source checkout (it is not on a package index), so the hint names
    the extra as ``pip install -c constraints.txt -e ".[extra]"`` run there, and ``package`` (the
    distribution the extra brings, when there is one) as the way for an installed copy of granet.

    >>> install_hint("plots", "matplotlib")
    'pip install -c constraints.txt -e ".[plots]" in the granet checkout (or pip install matplotlib)'
    """
    hint = f'pip install -c constraints.txt -e ".[{extra}]" in the granet checkout'
    return hint if package is None else f"{hint} (or pip install {package})"


def short_text(text: str, limit: int = 60) -> str:
    """``text`` cut to ``limit`` characters, for error messages (user values can be any size)."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def short_repr(value: object, limit: int = 60) -> str:
    """``repr(value)`` cut to ``limit`` characters, for error messages.

    Containers are summarised by their type and length before ``repr`` is taken, so a huge value
    (a YAML alias bomb expands to millions of items) costs nothing to describe.
    """
    if isinstance(value, (list, tuple, dict, set)) and len(value) > limit:
        return f"<{type(value).__name__} of {len(value)} items>"
    return short_text(repr(value), limit)
