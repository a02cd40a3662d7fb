"""The folder one training writes into: one training at a time, replaced only once its
replacement has a checkpoint.

A training holds a lock on its folder (``<out>/.lock``, removed when it ends; the lock itself is
released by the system however the process ends), so a second ``cae train`` into the same
``--out`` is refused instead of interleaving its files. ``--overwrite`` moves the old training
aside and removes it only once the new training has written its first checkpoint; a new training
that fails before that (or is killed outright: the next training into the folder sees it) gives
the old one back. A folder a failed training created holds no checkpoint and is removed.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
from pathlib import Path
from types import TracebackType

from cae.data.atomic import check_output_path, clean_leftovers, move_aside, remove
from cae.errors import ConfigError

log = logging.getLogger(__name__)

LOCK_NAME = ".lock"
CHECKPOINT = Path("checkpoints") / "last.pt"  # the latest checkpoint, inside the folder
BEST_CHECKPOINT = Path("checkpoints") / "best.pt"  # the epoch output.best_by chose, beside it


def holds_training(path: Path) -> bool:
    """Whether ``path`` holds a training's checkpoint."""
    return (path / CHECKPOINT).is_file()


def clean_training_leftovers(path: Path) -> None:
    """Give back a training that a killed ``--overwrite`` moved aside from ``path`` before the
    new one had a checkpoint (or remove it, if the new one had); remove other leftovers of
    killed writers beside ``path``."""
    for leftover in clean_leftovers(path, arrived=holds_training):
        log.warning("cleaned %s, left by a killed training", leftover)


class TrainingFolder:
    """Context manager around one training's writes to ``path`` (see the module's docstring).

    Args:
        path: the output folder (``output.dir``).
        overwrite: replace a training already in ``path`` (once the new one has a checkpoint).

    Raises:
        ConfigError: on entering: ``path`` cannot be a folder (it is a file, lies under one or
            cannot be written), or another training holds it.
    """

    def __init__(self, path: Path, *, overwrite: bool) -> None:
        self.path = Path(path)
        self.overwrite = overwrite
        self.old: Path | None = None  # the training moved aside by --overwrite
        self.created = False
        self.committed = False
        self._locks: list[int] = []

    def __enter__(self) -> TrainingFolder:
        check_output_path(self.path, "output folder (--out)", folder=True)
        clean_training_leftovers(self.path)
        self.created = not self.path.exists()
        self.path.mkdir(parents=True, exist_ok=True)
        self._lock()
        self.committed = holds_training(self.path)
        return self

    def _lock(self) -> None:
        path = self.path / LOCK_NAME
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            # the file may have been removed by a training that ended meanwhile: then the lock
            # is on a file nobody else will open, and the folder is not held by it
            if os.fstat(descriptor).st_ino != os.stat(path).st_ino:
                raise BlockingIOError
        except (BlockingIOError, FileNotFoundError):
            os.close(descriptor)
            raise ConfigError(
                f"{self.path} is in use by another training (it holds {path}); wait for it to "
                "end, or choose another --out"
            ) from None
        self._locks.append(descriptor)

    def set_aside_old(self) -> None:
        """With ``overwrite`` and a training in the folder, move that training aside and start
        the folder anew (the old one stays locked until this training ends)."""
        if not (self.overwrite and holds_training(self.path)):
            return
        self.old = move_aside(self.path)
        self.path.mkdir()
        self.created = True
        self.committed = False
        self._lock()

    def commit(self) -> None:
        """The training wrote a checkpoint: from now on the folder is kept whatever happens, and
        a training it replaces is removed."""
        if self.old is not None:
            remove(self.old)
            self.old = None
        self.committed = True

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        try:
            if kind is not None and not self.committed:
                if self.old is not None:  # give the replaced training back
                    remove(self.path)
                    os.replace(self.old, self.path)
                    self.old = None
                elif self.created:
                    remove(self.path)
        finally:
            self._unlock()

    def _unlock(self) -> None:
        """Remove the lock file (while still holding it), then let go of every lock."""
        path = self.path / LOCK_NAME
        held = {os.fstat(descriptor).st_ino for descriptor in self._locks}
        with contextlib.suppress(FileNotFoundError):
            if os.stat(path).st_ino in held:
                path.unlink()
        for descriptor in self._locks:
            os.close(descriptor)
        self._locks.clear()
