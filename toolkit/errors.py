"""User-facing error types.

Each carries one line for the user: what is wrong, where, and what to do. The CLI prints the
message and exits with code 2; nothing else in the package prints tracebacks for these.
"""

from __future__ import annotations


class MegaforgeError(Exception):
    """Base class for errors caused by user input (config, data, files)."""

    exit_code = 2


class ConfigError(MegaforgeError):
    """A recipe, config key or value is invalid."""


class RecipeError(ConfigError):
    """A recipe name or file does not exist."""


class DataError(MegaforgeError):
    """A data file is missing, corrupt or truncated."""


class TokenizerError(MegaforgeError):
    """A tokenizer is missing, corrupt or does not match the data."""


class CheckpointError(MegaforgeError):
    """A checkpoint is missing, incomplete or incompatible."""


class ParallelConfigError(ConfigError):
    """A parallel layout does not fit the world size or the model."""


class TrainingDiverged(MegaforgeError):
    """The loss or gradient norm stayed non-finite for ``trainer.max_skipped_steps`` steps in a row."""

    exit_code = 3


# ``megaforge train`` exits with this code after a graceful stop on SIGTERM or ``trainer.exit_signal``
# (a checkpoint was saved; run the same command to continue). 75 is EX_TEMPFAIL: "try again later".
PREEMPTED_EXIT_CODE = 75


def closest(name: str, candidates) -> str | None:
    """The candidate closest to ``name`` (for 'did you mean' hints), or None."""
    import difflib

    matches = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.5)
    return matches[0] if matches else None


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type name when the message is empty): what a
    one-line user error quotes from a library's exception."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
