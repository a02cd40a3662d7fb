"""The errors a user can act on.

Every error the platform raises for bad input derives from :class:`CAEError`. Its message names
the file, field or value at fault and says what to do; the ``cae`` command prints it without a
stack trace and exits with status 2.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pydantic import ValidationError


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


def describe_invalid(err: ValidationError) -> str:
    """What pydantic refused, one clause per problem: ``train.epochs = 0: Input should be ...``.

    A problem found by a model's own check across its values (no location) is its message alone.
    """
    clauses = []
    for item in err.errors():
        name = ".".join(str(part) for part in item["loc"])
        if not name:
            clauses.append(item["msg"].removeprefix("Value error, "))
            continue
        value = item.get("input")
        shown = "" if isinstance(value, dict) else f" = {value!r}"
        clauses.append(f"{name}{shown}: {item['msg']}")
    return "; ".join(clauses)
