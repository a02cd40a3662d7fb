"""Atomic file writes: a reader sees the old file or the new one, never half of either."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from cae.errors import DataError


@contextmanager
def atomic_write(path: Path) -> Iterator[BinaryIO]:
    """Open a temporary file beside ``path`` for binary writing; on success fsync it and rename it
    over ``path``; on any error (or interruption) remove it and leave ``path`` as it was.

    Args:
        path: the file to (re)place; its folder is created if needed.

    Yields:
        The open temporary file.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as file:
            yield file
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def atomic_folder(out: Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling folder to fill; on success it becomes ``out`` (an old ``out`` is
    removed only after the new one is in place); on any error it is removed and ``out`` is left
    as it was. An interrupted run therefore never leaves a partial folder behind.

    Args:
        out: the folder to create (or replace, with ``overwrite``).
        overwrite: replace ``out`` if it exists and is not empty.

    Yields:
        The temporary folder.

    Raises:
        DataError: ``out`` exists and is not an empty folder, and ``overwrite`` is False.
    """
    out = Path(out)
    exists = out.exists() or out.is_symlink()
    if exists and not overwrite and not (out.is_dir() and not any(out.iterdir())):
        raise DataError(
            f"output folder {str(out)!r} already exists and is not empty; pass overwrite=True "
            "(CLI --overwrite) to replace it, or choose another folder"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _move_into_place(tmp, out)


def _move_into_place(tmp: Path, out: Path) -> None:
    """Rename the finished folder ``tmp`` to ``out``, removing any old ``out`` only afterwards."""
    old: Path | None = None
    if out.exists() or out.is_symlink():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        old.rmdir()
        os.replace(out, old)
    try:
        os.replace(tmp, out)
    except BaseException:
        if old is not None:
            os.replace(old, out)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink()
