"""The errors a user can act on.

Every error the platform raises for bad input derives from :class:`CAEError`. Its message names
the file, field or value at fault and says what to do; the ``cae`` command prints it without a
stack trace and exits with status 2.
"""

from __future__ import annotations


class CAEError(Exception):
    """Base class of every error caused by the user's input or settings (CLI exit code 2)."""


class ConfigError(CAEError):
    """A setting is missing, malformed or inconsistent with another one."""


class DataError(CAEError):
    """An input file is missing, unreadable or inconsistent (row counts, gene counts, values)."""


class MetadataError(DataError):
    """A metadata field is missing, unusable, or holds a value the vocabulary does not know."""


class CheckpointError(CAEError):
    """A checkpoint or output folder cannot be read, or would overwrite the user's work."""
