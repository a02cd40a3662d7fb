"""Atomic file writes: a reader sees the old file or the new one, never half of either.

Temporary files and folders are hidden siblings of what they become, named after the process that
writes them (``.NAME.tmp-PID@HOST-XXXXXXXX``). A command killed outright (``kill -9``, an out-of-
memory kill) cannot remove its own; the next write of the same ``NAME`` removes those whose process
is gone (:func:`clean_leftovers`). What is written follows the umask, like any file the user makes.
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from cae.errors import ConfigError, DataError

_LEFTOVER = re.compile(r"\.(?P<kind>tmp|old)-(?P<pid>\d+)@(?P<host>.+)-[^-]+")


def current_umask() -> int:
    """The process's umask (read from /proc on Linux: setting it to read it is not thread-safe)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _prefix(path: Path, kind: str) -> str:
    return f".{path.name}.{kind}-{os.getpid()}@{socket.gethostname()}-"


def _process_gone(pid: int) -> bool:
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def clean_leftovers(path: Path, arrived: Callable[[Path], bool] = os.path.lexists) -> list[Path]:
    """Remove what killed writers of ``path`` on this host left beside it: their temporary files
    and folders; a folder moved aside while being replaced is moved back when its replacement
    never arrived (``arrived(path)`` is false: by default, ``path`` is missing), else removed.

    Returns:
        The leftovers removed or restored.
    """
    found: list[Path] = []
    if not path.parent.is_dir():
        return found
    host = socket.gethostname()
    for sibling in path.parent.glob(f".{glob.escape(path.name)}.*-*@*-*"):
        match = _LEFTOVER.fullmatch(sibling.name[len(path.name) + 1 :])
        if not match or match["host"] != host or not _process_gone(int(match["pid"])):
            continue
        found.append(sibling)
        if match["kind"] == "old" and not arrived(path):
            remove(path)
            os.replace(sibling, path)
        else:
            remove(sibling)
    return found


def check_output_path(path: Path, what: str, *, folder: bool) -> Path:
    """Check, before any work, that ``path`` can be written as a file (or a folder).

    Args:
        path: what a command will write.
        what: how the user named it, for messages (e.g. ``--out``).
        folder: whether it will be a folder.

    Returns:
        ``path``.

    Raises:
        ConfigError: ``path`` is a folder where a file is wanted (or the reverse), lies under a
            file, or its nearest existing folder is not writable.
    """
    path = Path(path)
    if path.exists() and path.is_dir() != folder:
        kinds = ("a file", "a folder") if folder else ("a folder", "a file")
        raise ConfigError(f"{what} {path} is {kinds[0]}, not {kinds[1]}; choose another path")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(
            f"{what} {path} cannot be written: {parent} is a file, not a folder; choose a path "
            "in a folder"
        )
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(
            f"{what} {path} cannot be written: no permission to write in {parent}; choose a "
            "folder you can write to"
        )
    return path


def _temporary_file(path: Path) -> tuple[int, str]:
    """Create an empty hidden sibling file of ``path`` (its folder made if needed, named after
    this process, following the umask; leftovers of killed writers removed first). Returns its
    open descriptor and its path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_leftovers(path)
    handle, tmp = tempfile.mkstemp(prefix=_prefix(path, "tmp"), dir=path.parent)
    os.fchmod(handle, 0o666 & ~current_umask())  # mkstemp makes it private
    return handle, tmp


@contextmanager
def atomic_write(path: Path) -> Iterator[BinaryIO]:
    """Open a temporary file beside ``path`` for binary writing; on success fsync it and rename it
    over ``path``; on any error (or interruption) remove it and leave ``path`` as it was.

    Args:
        path: the file to (re)place; its folder is created if needed.

    Yields:
        The open temporary file.
    """
    handle, tmp = _temporary_file(path)
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
def atomic_file(path: Path) -> Iterator[Path]:
    """Yield the path of a temporary sibling file to write (by a library that opens it by name);
    on success it becomes ``path``; on any error it is removed, with the folders made for it, and
    ``path`` is left as it was."""
    created = [p for p in reversed(path.parents) if not p.exists()]  # outermost first
    handle, tmp = _temporary_file(path)
    os.close(handle)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        for folder in reversed(created):  # the folders made for it, innermost first
            with contextlib.suppress(OSError):
                folder.rmdir()
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
    out = check_output_path(Path(out), "output folder", folder=True)
    exists = out.exists() or out.is_symlink()
    if exists and not overwrite and not (out.is_dir() and not any(out.iterdir())):
        raise DataError(
            f"output folder {str(out)!r} already exists and is not empty; pass overwrite=True "
            "(CLI --overwrite) to replace it, or choose another folder"
        )
    tmp = staging_folder(out)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _move_into_place(tmp, out)


def staging_folder(path: Path) -> Path:
    """Create and return an empty hidden sibling folder in which ``path`` is prepared (named
    after this process; leftovers of killed writers of ``path`` are removed first)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_leftovers(path)
    tmp = Path(tempfile.mkdtemp(prefix=_prefix(path, "tmp"), dir=path.parent))
    tmp.chmod(0o777 & ~current_umask())  # mkdtemp makes it private
    return tmp


def move_aside(path: Path) -> Path:
    """Rename ``path`` to a hidden sibling named after this process (restored by
    :func:`clean_leftovers` if this process dies before ``path`` is replaced); returns it."""
    old = Path(tempfile.mkdtemp(prefix=_prefix(path, "old"), dir=path.parent))
    old.rmdir()
    os.replace(path, old)
    return old


def remove(path: Path) -> None:
    """Remove a file, link or folder tree (nothing if it is gone)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _move_into_place(tmp: Path, out: Path) -> None:
    """Rename the finished folder ``tmp`` to ``out``, removing any old ``out`` only afterwards."""
    old = move_aside(out) if out.exists() or out.is_symlink() else None
    try:
        os.replace(tmp, out)
    except BaseException:
        if old is not None:
            os.replace(old, out)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        remove(old)
