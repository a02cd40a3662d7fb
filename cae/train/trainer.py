"""The training loop: epochs, validation, contributions, checkpoints and callbacks.

``train(settings)`` is the one training path: the ``cae train`` command, the MLproject and Optuna
objectives all call it. It knows nothing of MLflow: it emits events to :class:`Callback` objects
(``cae.tracking`` provides the MLflow/TensorBoard one).
"""

from __future__ import annotations

import json
import logging
import math
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from cae.config import Settings
from cae.data.atomic import atomic_write
from cae.data.contexts import selection_fields
from cae.data.loader import (
    Batch,
    ChunkDataset,
    EpochOrder,
    LoadedChunk,
    chunk_loader,
    epoch_seed,
    expected_single_value_fraction,
    iter_batches,
    single_value_batches,
    split_rows,
    to_device,
    windows_of,
)
from cae.data.soma import is_soma_uri
from cae.data.store import DataStore
from cae.data.vocabulary import (
    FieldSpec,
    Vocabularies,
    build_field_specs,
    require_usable,
    save_preprocessed,
)
from cae.errors import CAEError, CheckpointError, ConfigError
from cae.model.cae import contribution_l2
from cae.model.contributions import ContextTable, field_means
from cae.train import distributed
from cae.train.checkpoint import Checkpoint, PartialEpoch, copy_checkpoint
from cae.train.cycle import (
    ContextMeans,
    classifier_hits,
    classifier_loss,
    generator_losses,
    moved_contexts,
    sample_targets,
    training_step,
)
from cae.train.folder import BEST_CHECKPOINT, CHECKPOINT, TrainingFolder, clean_training_leftovers
from cae.train.host import configure_host
from cae.train.networks import training_networks
from cae.train.optim import build_optimizers, scheduled_lr
from cae.train.passes import FusedPasses

log = logging.getLogger(__name__)


# The largest table of combination means train.context_means_reference = "data" builds (bytes).
_REFERENCE_LIMIT = 2 * 2**30


class TrainingError(CAEError):
    """Training cannot go on (a non-finite or diverged loss); the last good checkpoint is kept."""


DIVERGED = 10.0
"""An epoch's training loss above this many times the lowest of an earlier epoch stops the
training as diverged. Healthy trainings fall, or rise by a few per cent, after their first epoch;
Kang's preset trained for 20 epochs on the NK fold rose from 0.46 to 24,000 in epoch 18
(``docs/decisions.md``)."""


class StopTraining(Exception):  # noqa: N818 (a signal, not an error)
    """Raised by a callback to end training early on purpose (e.g. a pruned tuning trial)."""


class Preempted(BaseException):
    """SIGTERM or SIGUSR1 arrived: training wrote a checkpoint at the next window boundary and
    stopped; ``--resume`` continues exactly where it stopped. The CLI exits with
    :data:`EXIT_PREEMPTED` so that a job script can requeue itself."""

    def __init__(self, signal_name: str, checkpoint: Path) -> None:
        super().__init__(
            f"stopped by {signal_name}; checkpoint written mid-epoch to {checkpoint}; "
            "continue with --resume"
        )
        self.checkpoint = checkpoint


EXIT_PREEMPTED = 75  # EX_TEMPFAIL: try again later
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


@dataclass
class TrainResult:
    """What a training produced."""

    out_dir: Path
    checkpoint: Path
    epochs: int  # epochs completed in total (resumed runs included)
    history: list[dict[str, float]]  # one metrics dict per epoch
    contributions: pd.DataFrame  # per field and context value, from the last evaluation
    vocabularies: Vocabularies
    field_specs: dict[str, FieldSpec]
    data_fingerprint: str
    best_checkpoint: Path | None = None  # checkpoints/best.pt, unless output.best_by is none
    best_epoch: int | None = None  # the epoch best.pt holds

    @property
    def final(self) -> dict[str, float]:
        """The last epoch's metrics."""
        return self.history[-1]


class Callback:
    """Receives training events; override what you need (every method is a no-op here)."""

    def on_train_start(self, trainer: Trainer) -> None:
        """Called once data, vocabularies and networks are ready, before the first epoch and
        before anything is written to the output folder."""

    def on_epoch_end(self, trainer: Trainer, epoch: int, metrics: dict[str, float]) -> None:
        """Called after each epoch's validation with that epoch's metrics."""

    def on_window_end(self, trainer: Trainer, epoch: int, windows_done: int) -> None:
        """Called after each shuffle window of an epoch (``windows_done`` so far in the epoch):
        the points where a preempted training stops and resumes."""

    def on_checkpoint(self, trainer: Trainer, path: Path) -> None:
        """Called after a checkpoint was written."""

    def on_train_end(self, trainer: Trainer, result: TrainResult) -> None:
        """Called once after the last epoch."""


class _Means:
    """Sums and counts kept on the device; read back once per epoch (no per-step host sync).
    With several training processes the sums and counts are added across ranks when read."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, torch.Tensor | float] = {}

    def add(self, name: str, total: torch.Tensor, count: torch.Tensor | float) -> None:
        self.sums[name] = self.sums.get(name, 0) + total.detach().float()
        self.counts[name] = self.counts.get(name, 0) + count

    def read(self, prefix: str) -> dict[str, float]:
        if not self.sums:
            return {}
        names = list(self.sums)
        totals = torch.stack([self.sums[n] for n in names])
        counts = torch.stack([torch.as_tensor(self.counts[n]).to(totals) for n in names])
        both = torch.stack([totals, counts])  # (2, metrics): one reduction for all
        distributed.all_reduce_sum([both])
        values = both.cpu().tolist()
        return {f"{prefix}{n}": t / c for n, t, c in zip(names, *values, strict=True) if c}


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu; anything else as torch reads it.

    Raises:
        ConfigError: the device asked for is not on this machine (the message says which are).
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(f"train.device = {name!r} but no CUDA device is available; use cpu")
        if device.index is not None and device.index >= count:
            raise ConfigError(
                f"train.device = {name!r} but this machine has {count} CUDA device(s), "
                f"cuda:0 to cuda:{count - 1}; pick one of them or use auto"
            )
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"train.device = {name!r} but MPS is not available here; use cpu")
    return device


def default_out_dir(settings: Settings) -> Path:
    """``runs/<UTC time>-<fields>`` under the working directory."""
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{stamp}-{'-'.join(settings.data.fields)}"


class Trainer:
    """Holds one training's data, networks and optimisers; :meth:`fit` runs the epochs.

    Args:
        settings: the settings; ``output.dir`` is where it writes.
        callbacks: receivers of training events.
        folder: the locked output folder (:class:`TrainingFolder`; None: the caller does not
            write, like every process but the first under torchrun).
        store: the cells, already open (an AnnData in memory); None opens ``data.path``.

    Raises:
        CAEError: bad data, settings, or an output folder that would be overwritten.
    """

    def __init__(
        self,
        settings: Settings,
        callbacks: Sequence[Callback] = (),
        folder: TrainingFolder | None = None,
        store: DataStore | None = None,
    ) -> None:
        self.settings = settings
        self.folder = folder
        self.ranks = distributed.ranks_from_environment()
        # Only rank 0 writes files and tracks; the other ranks train silently beside it.
        self.callbacks = list(callbacks) if self.ranks.is_main else []
        self.device = resolve_device(settings.train.device)
        if self.ranks.enabled:
            self.device = distributed.start(self.ranks, self.device)
        self.out_dir = Path(settings.output.dir or default_out_dir(settings))
        self.checkpoint_path = self.out_dir / CHECKPOINT
        saved = self._check_out_dir()
        self._open_data(saved, store)
        torch.manual_seed(settings.train.seed)
        sizes = self.vocabularies.sizes()
        self.networks = training_networks(
            settings, self.store.n_genes, sizes, self.device, self.ranks
        )
        self.optimizer, self.classifier_optimizer = build_optimizers(
            self.networks.model,
            self.networks.classifier,
            settings.train.lr,
            settings.train.classifier_lr,
            settings.train.torch_internals,
        )
        self.sizes = torch.tensor([sizes[f] for f in self.vocabularies.fields])
        self.history: list[dict[str, float]] = []
        # Each head's output on the first evaluation batch of the last epoch (for histograms).
        self.head_samples: dict[str, torch.Tensor] = {}
        self.start_epoch = 1
        self.partial: PartialEpoch | None = None  # where a preempted epoch stopped
        self.stop_signal: str | None = None
        if saved is not None:
            self._restore(saved)
        self._build_loaders()

    def _check_out_dir(self) -> Checkpoint | None:
        """The checkpoint to resume (``output.resume``), or None for a new training.

        Raises:
            CheckpointError: nothing to resume, or a training that would be overwritten.
            ConfigError: the checkpoint's model settings or fields differ from those given.
        """
        output = self.settings.output
        has_checkpoint = self.checkpoint_path.is_file()
        if output.resume:
            if not has_checkpoint:
                raise CheckpointError(
                    f"cannot resume: no checkpoint at {self.checkpoint_path}; pass the --out "
                    "folder of the training to continue"
                )
            saved = Checkpoint.read(self.checkpoint_path)
            if saved.settings.model != self.settings.model:
                raise ConfigError(
                    f"cannot resume {self.checkpoint_path} with other model settings: saved "
                    f"{saved.settings.model!r}, now {self.settings.model!r}"
                )
            if saved.settings.data.fields != self.settings.data.fields:
                raise ConfigError(
                    f"cannot resume with fields {self.settings.data.fields}: the checkpoint was "
                    f"trained on {saved.settings.data.fields}"
                )
            return saved
        if has_checkpoint and not output.overwrite:
            raise CheckpointError(
                f"{self.out_dir} already holds a training; pass --resume to continue it, "
                "--overwrite to replace it, or --out to choose another folder"
            )
        return None

    def _open_data(self, saved: Checkpoint | None, store: DataStore | None) -> None:
        """Open the data (unless ``store`` is given) and take the fields' specs and
        vocabularies: the checkpoint's when resuming, else built from the data's metadata (and
        the values checked when asked)."""
        cfg = self.settings
        self.store = store if store is not None else DataStore.open(cfg.data)
        for chunk_id in cfg.data.val_chunks:
            self.store.chunk(chunk_id)
        self.fingerprint = self.store.fingerprint()
        if saved is not None:
            self.vocabularies = saved.vocabularies
            self.field_specs = saved.field_specs
            if saved.data_fingerprint != self.fingerprint:
                log.warning("resuming on data whose fingerprint differs from the checkpoint's")
        else:
            self.field_specs = build_field_specs(
                self.store.iter_metadata(cfg.data.fields), cfg.data.fields, cfg.data.null_values
            )
            require_usable(self.field_specs, str(self.store.path))
            self.vocabularies = Vocabularies.from_specs(self.field_specs)
        for spec in self.field_specs.values():  # only in checkpoints of older versions
            if not spec.using:
                log.warning("field '%s' is skipped: %s", spec.field, spec.reason)
        if cfg.data.validate_values == "full" and saved is None:
            self.store.check_values(cfg.data.transform, progress=cfg.train.progress)

    def _restore(self, saved: Checkpoint) -> None:
        """Take the networks, optimisers, history and epoch of the checkpoint to resume.

        Raises:
            ConfigError: ``train.ema`` is on but the checkpoint has no average, or the checkpoint
                already finished ``train.epochs``.
        """
        networks = self.networks
        networks.model.load_state_dict(saved.model)
        if networks.averaged is not None:
            if saved.averaged is None:
                raise ConfigError(
                    f"{self.checkpoint_path} was trained without train.ema; resume it with "
                    "train.ema = 0, or start a new training"
                )
            networks.averaged.load_state_dict(saved.averaged)
        networks.classifier.load_state_dict(saved.classifier)
        self.optimizer.load_state_dict(saved.optimizer)
        self.classifier_optimizer.load_state_dict(saved.classifier_optimizer)
        self.history = saved.history
        self.start_epoch = saved.epoch + 1
        self.partial = saved.partial
        if self.partial is not None:  # preempted mid-epoch: that epoch goes on
            self.start_epoch = self.partial.epoch
            log.info(
                "resuming epoch %d after window %d", self.start_epoch, self.partial.windows_done
            )
            return
        if self.start_epoch > self.settings.train.epochs:
            raise ConfigError(
                f"{self.checkpoint_path} already finished {saved.epoch} epochs; "
                f"raise --epochs above {saved.epoch} to train longer"
            )
        log.info("resuming %s after epoch %d", self.out_dir, saved.epoch)

    def _build_loaders(self) -> None:
        """The training and evaluation loaders, the epoch order, the mixing watch and the
        context-means reference.

        Raises:
            ConfigError: no training chunk, too few chunks for the processes, or an unusable
                ``data.exclude`` or ``train.context_means_reference``.
        """
        cfg, ranks = self.settings, self.ranks
        dataset = ChunkDataset(
            self.store,
            self.vocabularies,
            cfg.data.null_values,
            val_chunks=cfg.data.val_chunks,
            val_fraction=cfg.data.val_fraction,
            seed=cfg.train.seed,
            exclude=cfg.data.exclusions,
            library_key=cfg.data.library_key,
        )
        train_idx, val_idx, self.n_train_cells, self.n_val_cells = self._split_counts()
        if not train_idx:
            raise ConfigError("every chunk is a validation chunk; leave some for training")
        if ranks.enabled and min(len(train_idx), len(val_idx or train_idx)) < ranks.world_size:
            raise ConfigError(
                f"{ranks.world_size} training processes need at least {ranks.world_size} training "
                "and validation chunks each; use fewer processes or smaller chunks"
            )
        window = cfg.data.shuffle_chunks
        self.order = EpochOrder(train_idx, cfg.train.seed, ranks.rank, ranks.world_size, window)
        workers, prefetch = cfg.data.num_workers, cfg.data.prefetch_factor
        self.train_loader = chunk_loader(dataset, self.order, workers, prefetch, window)
        # Without held-out cells, epochs are evaluated on the training cells.
        self.eval_rows = "val_rows" if val_idx else "train_rows"
        # Evaluation takes the same windows every epoch: those of a fixed permutation (epoch 0's,
        # which training never uses), so sorted held-out chunks mix too.
        evaluation = EpochOrder(val_idx or train_idx, cfg.train.seed, ranks.rank,
                                ranks.world_size, window)  # fmt: skip
        self.eval_windows = [len(w) for w in evaluation.windows(0)]
        self.eval_loader = chunk_loader(dataset, list(evaluation), workers, prefetch, window)
        # Mixing watch: per field, the fraction of training batches in which it takes one value,
        # beside what a full shuffle would give (data sorted past what the window mixes).
        self.mixing_warned: set[str] = set()
        self.single_value_expected = {
            name: expected_single_value_fraction(
                list(self.field_specs[name].counts.values()), cfg.train.batch_size
            )
            for name in self.vocabularies.fields
        }
        self.reference: ContextMeans | None = None
        if cfg.train.weights.context_means > 0 and self._reference_from_data():
            self.reference = self._context_means(chunk_loader(dataset, train_idx, workers, 1))

    def _reference_from_data(self) -> bool:
        """Whether the context-means term compares with all training cells' means (``data``),
        not the batch's: as set, or under ``auto`` where the table fits and one process trains."""
        choice = self.settings.train.context_means_reference
        if choice != "auto":
            return choice == "data"
        table = ContextMeans.table_bytes(self.sizes, self.store.n_genes)
        if table <= _REFERENCE_LIMIT and not self.ranks.enabled:
            return True
        log.info(
            "train.context_means_reference = auto: comparing with each batch's cells (%s)",
            "several training processes" if self.ranks.enabled else
            f"a table of every context combination would take {table / 2**30:.1f} GiB",
        )  # fmt: skip
        return False

    def _split_counts(self) -> tuple[list[int], list[int], int, int]:
        data, seed = self.settings.data, self.settings.train.seed
        held_out = {int(c) for c in data.val_chunks}
        exclusions = data.exclusions
        matched = [0] * len(exclusions)
        train_idx, val_idx, n_train, n_val = [], [], 0, 0
        self.train_rows_per_chunk: dict[int, int] = {}
        for index, chunk in enumerate(self.store.chunks):
            excluded = None
            if exclusions:
                frame = self.store.read_metadata(chunk, selection_fields(exclusions))
                hits = [selection.mask(frame) for selection in exclusions]
                matched = [m + int(h.sum()) for m, h in zip(matched, hits, strict=True)]
                excluded = np.logical_or.reduce(hits)
            train_rows, val_rows = split_rows(
                chunk.chunk_id,
                chunk.n_cells,
                data.val_fraction,
                seed,
                held_out=int(chunk.chunk_id) in held_out,
                excluded=excluded,
            )
            if len(train_rows):
                train_idx.append(index)
                self.train_rows_per_chunk[index] = len(train_rows)
            if len(val_rows):
                val_idx.append(index)
            n_train += len(train_rows)
            n_val += len(val_rows)
        for selection, count in zip(exclusions, matched, strict=True):
            if count == 0:
                raise ConfigError(
                    f"data.exclude '{selection}' matches no cell of {data.path}; check the "
                    "field names and values (they compare as text, case-sensitively)"
                )
            log.info("data.exclude '%s' keeps %d cells out of training", selection, count)
        return train_idx, val_idx, n_train, n_val

    def _context_means(self, loader: Iterable[LoadedChunk]) -> ContextMeans:
        """The training cells' mean per context combination (train.context_means_reference)."""
        table = ContextMeans.table_bytes(self.sizes, self.store.n_genes)
        if table > _REFERENCE_LIMIT:
            raise ConfigError(
                f"train.context_means_reference = 'data' needs a table of every combination of "
                f"the fields' categories x {self.store.n_genes:,} genes ({table / 2**30:.1f} GiB); "
                "use 'batch', or fewer fields"
            )
        if self.ranks.enabled:
            raise ConfigError(
                "train.context_means_reference = 'data' is computed in one process; with "
                "several training processes use 'batch'"
            )
        bar = tqdm(
            total=self.n_train_cells, desc="context means", unit="cells", leave=False,
            disable=not self.settings.train.progress,
        )  # fmt: skip

        def counted() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
            for chunk in loader:
                for batch in self._batches([chunk], "train_rows", None):
                    bar.update(batch.x.shape[0])
                    yield batch.x, batch.contexts

        with bar:
            return ContextMeans.accumulate(counted(), self.sizes, self.store.n_genes)

    def _emit(self, event: str, *args: object) -> None:
        for callback in self.callbacks:
            getattr(callback, event)(self, *args)

    def fit(self) -> TrainResult:
        """Train from the start (or the resumed epoch) to ``train.epochs``.

        Returns:
            The :class:`TrainResult`.

        Raises:
            TrainingError: a loss became non-finite (the last good checkpoint is kept).
        """
        restore_host = configure_host(
            self.settings.train.threads, self.settings.train.keep_freed_memory
        )
        try:
            if self.ranks.enabled:  # a mid-epoch stop would need every rank to agree where
                return self._fit()
            with _SignalGuard(self):
                return self._fit()
        finally:
            restore_host()

    def _fit(self) -> TrainResult:
        cfg = self.settings
        self._emit("on_train_start")  # first: a tracking store that does not answer writes nothing
        if self.folder is not None:
            self.folder.set_aside_old()
        self._write_static_files()
        table = pd.DataFrame()
        for epoch in range(self.start_epoch, cfg.train.epochs + 1):
            started = time.perf_counter()
            metrics = {"epoch": float(epoch)}
            metrics.update(self._train_epoch(epoch))
            self._check_divergence(epoch, metrics)
            evaluation, table = self._evaluate()
            self._check_evaluation(epoch, evaluation)
            metrics.update(evaluation)
            seconds = time.perf_counter() - started
            metrics["time/epoch_seconds"] = seconds
            metrics["time/cells_per_second"] = self.n_train_cells / seconds
            self.history.append(metrics)
            self._log_epoch(epoch, metrics)
            self._save(epoch)
            self._keep_best(epoch)
            self._emit("on_epoch_end", epoch, metrics)
            self._emit("on_checkpoint", self.checkpoint_path)
        if table.empty:  # resumed at the last epoch: evaluate once for the table
            _, table = self._evaluate()
        if self.ranks.is_main:
            table.to_csv(self.out_dir / "contributions.csv", index=False)
        result = TrainResult(
            self.out_dir,
            self.checkpoint_path,
            int(self.history[-1]["epoch"]) if self.history else 0,
            self.history,
            table,
            self.vocabularies,
            self.field_specs,
            self.fingerprint,
            *self._best(),
        )
        self._emit("on_train_end", result)
        return result

    def _best_key(self) -> str | None:
        """The metric ``output.best_by`` names (``val/<term>``, or ``eval/<term>`` when no cells
        are held out); None when no best checkpoint is kept."""
        term = self.settings.output.best_by
        if term == "none":
            return None
        return f"{self._eval_prefix}{term}"

    @property
    def _eval_prefix(self) -> str:
        """``val/`` for metrics of held-out cells, ``eval/`` when none are held out."""
        return "val/" if self.eval_rows == "val_rows" else "eval/"

    def _keep_best(self, epoch: int) -> None:
        """Copy this epoch's checkpoint to ``best.pt`` when its ``output.best_by`` term is the
        lowest of the training so far (resumed epochs included; ties keep the earlier epoch)."""
        key = self._best_key()
        if key is None or not self.ranks.is_main:
            return
        *before, now = [row.get(key, math.inf) for row in self.history]
        if before and now >= min(before):
            return
        copy_checkpoint(self.checkpoint_path, self.out_dir / BEST_CHECKPOINT)
        log.info("epoch %d has the lowest %s so far (%.5g): saved as best.pt", epoch, key, now)

    def _best(self) -> tuple[Path | None, int | None]:
        """``best.pt`` and the epoch it holds, when one is kept and was written."""
        key = self._best_key()
        path = self.out_dir / BEST_CHECKPOINT
        if key is None or not self.history or not path.is_file():
            return None, None
        values = [row.get(key, math.inf) for row in self.history]
        return path, int(self.history[values.index(min(values))]["epoch"])

    def _batches(
        self,
        window: Sequence[LoadedChunk],
        rows: str,
        generator: torch.Generator | None,
    ) -> Iterator[Batch]:
        """The :class:`~cae.data.loader.Batch` of every batch drawn across the ``rows``
        (``train_rows`` or ``val_rows``) of one shuffle window's chunks."""
        cfg = self.settings
        yield from iter_batches(
            window,
            [getattr(chunk, rows) for chunk in window],
            cfg.train.batch_size,
            self.device,
            cfg.data.transform,
            generator,
        )

    def _autocast(self) -> AbstractContextManager:
        """bfloat16 autocast of forward passes when ``train.precision`` asks for it."""
        enabled = self.settings.train.precision == "bf16"
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=enabled)

    def _steps_per_rank(self, epoch: int) -> int | None:
        """With several processes, the steps every rank takes this epoch: the fewest any rank's
        chunks allow, so that all ranks stop together. None in one process (no limit)."""
        if not self.ranks.enabled:
            return None
        size = self.settings.train.batch_size
        steps = [
            sum(
                math.ceil(sum(self.train_rows_per_chunk[index] for index in window) / size)
                for window in self.order.windows(epoch, rank)
            )
            for rank in range(self.ranks.world_size)
        ]
        return min(steps)

    def _train_epoch(self, epoch: int) -> dict[str, float]:
        cfg = self.settings
        rows_gen = torch.Generator().manual_seed(epoch_seed(cfg.train.seed, epoch, "rows"))
        target_gen = torch.Generator().manual_seed(epoch_seed(cfg.train.seed, epoch, "targets"))
        means = _Means()
        skip = 0
        if self.partial is not None and self.partial.epoch == epoch:
            skip = self.partial.windows_done
            if self.partial.rows_generator is not None:
                rows_gen.set_state(self.partial.rows_generator)
            if self.partial.target_generator is not None:
                target_gen.set_state(self.partial.target_generator)
            means.sums = {k: v.to(self.device) for k, v in self.partial.sums.items()}
            means.counts = dict(self.partial.counts)
            self.partial = None
        self.order.set_epoch(epoch, skip_windows=skip)
        self._set_learning_rates(epoch)
        self.steps_left = self._steps_per_rank(epoch)
        self.networks.model.train()
        self.networks.classifier.train()
        bar = tqdm(
            total=self.n_train_cells,
            desc=f"epoch {epoch}/{cfg.train.epochs}",
            unit="cell",
            unit_scale=True,
            disable=None if cfg.train.progress else True,  # None: only on a terminal
            leave=False,
        )
        windows_done = skip
        sizes = [len(window) for window in self.order.remaining()]
        with bar:
            for window in windows_of(self.train_loader, sizes):
                if self.stop_signal is not None:
                    self._save_partial(epoch, windows_done, rows_gen, target_gen, means)
                    raise Preempted(self.stop_signal, self.checkpoint_path)
                self._train_window(window, rows_gen, target_gen, means, bar)
                windows_done += 1
                self._check_finite(means, epoch, window)
                self._emit("on_window_end", epoch, windows_done)
                if self.steps_left == 0:
                    break
        metrics = means.read("train/")
        self._watch_mixing(metrics)
        return metrics

    def _set_learning_rates(self, epoch: int) -> None:
        """Give both optimisers this epoch's rates (:func:`cae.train.optim.scheduled_lr`). Also
        on resume: a checkpoint's optimiser state holds the rates it had, and the settings now
        given win."""
        train = self.settings.train
        for optimizer, lr in [
            (self.optimizer, train.lr),
            (self.classifier_optimizer, train.classifier_lr),
        ]:
            for group in optimizer.param_groups:
                group["lr"] = scheduled_lr(lr, train.lr_schedule, epoch, train.epochs)

    def _watch_mixing(self, metrics: dict[str, float]) -> None:
        """Warn once per field whose training batches took a single value far more often than a
        full shuffle would give: the data are sorted by it past what the shuffle window mixes."""
        for name, expected in self.single_value_expected.items():
            observed = metrics.get(f"train/single_value_batches/{name}")
            if observed is None or name in self.mixing_warned or observed < expected + 0.2:
                continue
            self.mixing_warned.add(name)
            log.warning(
                "field '%s' takes a single value in %.0f%% of the training batches (a full "
                "shuffle would give %.0f%%): %s is sorted by it beyond what a shuffle window of "
                "data.shuffle_chunks = %d chunks mixes, so the classifier and the context terms "
                "see few contrasts; raise data.shuffle_chunks (--shuffle-chunks) or write the "
                "chunks shuffled",
                name, 100 * observed, 100 * expected, self.store.path,
                self.settings.data.shuffle_chunks,
            )  # fmt: skip

    def _check_finite(self, means: _Means, epoch: int, window: Sequence[LoadedChunk]) -> None:
        """Stop at the first window whose loss is not finite (one host sync per window), before
        any checkpoint of the broken weights is written."""
        loss = means.sums.get("loss")
        if loss is None or torch.isfinite(loss):
            return
        names = ", ".join(self.store.chunk(chunk.chunk_id).name for chunk in window)
        raise TrainingError(
            f"the training loss became {loss.item()} in epoch {epoch}, in the window of chunks "
            f"{names}; training stopped: {self._what_is_kept()}, or check those chunks' values "
            "and data.transform"
        )

    def _check_divergence(self, epoch: int, metrics: dict[str, float]) -> None:
        """Stop when an epoch's training loss is :data:`DIVERGED` times the lowest of an earlier
        epoch (resumed epochs included): the weights ran away (a finite loss, so
        :meth:`_check_finite` lets it pass), and a checkpoint of them would be served as a model.
        Stops before this epoch's checkpoint, metrics or table are written."""
        now = metrics.get("train/loss")
        earlier = [row for row in self.history if "train/loss" in row]
        if now is None or not earlier:
            return
        best = min(earlier, key=lambda row: row["train/loss"])
        if now <= DIVERGED * best["train/loss"]:
            return
        hint = ""
        if self.settings.train.lr_schedule == "constant":
            hint = ", or train with a decaying rate (train.lr_schedule = cosine, --lr-schedule)"
        raise TrainingError(
            f"the training loss rose from {best['train/loss']:.4g} (epoch {int(best['epoch'])}) "
            f"to {now:.4g} in epoch {epoch}: the training diverged; training stopped: "
            f"{self._what_is_kept()}{hint}"
        )

    def _check_evaluation(self, epoch: int, metrics: dict[str, float]) -> None:
        """Stop when an epoch's evaluation is not finite (weights that overflowed after the last
        finite training loss), before its checkpoint, metrics or table are written."""
        broken = sorted(name for name, value in metrics.items() if not math.isfinite(value))
        if not broken:
            return
        shown = ", ".join(f"{name} = {metrics[name]}" for name in broken[:3])
        more = f" and {len(broken) - 3} more" if len(broken) > 3 else ""
        raise TrainingError(
            f"the evaluation after epoch {epoch} is not finite ({shown}{more}): the weights "
            f"overflowed; training stopped: {self._what_is_kept()}"
        )

    def _what_is_kept(self) -> str:
        lr = f"train.lr (--lr, now {self.settings.train.lr:g})"
        if self.checkpoint_path.is_file():
            return (
                f"the last good checkpoint is kept at {self.checkpoint_path}; lower {lr} and "
                "continue with --resume"
            )
        return f"no checkpoint was written yet; lower {lr} and start again"

    def _train_window(
        self,
        window: Sequence[LoadedChunk],
        rows_gen: torch.Generator,
        target_gen: torch.Generator,
        means: _Means,
        bar: tqdm,
    ) -> None:
        cfg, networks = self.settings, self.networks
        single = np.zeros(len(self.vocabularies.fields))  # (F,) batches with one value
        batches = 0
        for batch in self._batches(window, "train_rows", rows_gen):
            x, source, host_source = batch.x, batch.contexts, batch.host_contexts
            if self.steps_left is not None:
                if self.steps_left == 0:
                    break
                self.steps_left -= 1
            n = x.shape[0]
            # Targets are drawn on the host (reproducible on any device) from the host copy of
            # the contexts, then copied over without waiting: no host sync in the step.
            target = to_device(sample_targets(host_source, self.sizes, target_gen), self.device)
            losses, c_loss = training_step(
                networks.model,
                networks.classifier,
                self.optimizer,
                self.classifier_optimizer,
                x,
                source,
                target,
                cfg.train.weights,
                passes=networks.train_passes,
                forward_classifier=networks.train_classifier,
                autocast=self._autocast(),
                residual=cfg.model.counterfactual == "residual",
                reference=self.reference,
                library=batch.library,
            )
            if networks.averaged is not None:
                networks.averaged.update_parameters(networks.model)
            for name, value in losses.terms().items():
                means.add(name, value * n, n)
            means.add("classifier", c_loss * n, n)
            single += single_value_batches(host_source)
            batches += 1
            bar.update(n)
        for i, name in enumerate(self.vocabularies.fields):  # once per window: no per-step copy
            means.add(
                f"single_value_batches/{name}", torch.tensor(single[i]).to(self.device), batches
            )

    @torch.no_grad()
    def _evaluate(self) -> tuple[dict[str, float], pd.DataFrame]:
        """Losses, classifier accuracies and contributions on the held-out cells (the training
        cells when nothing is held out), with targets drawn the same way every epoch."""
        cfg = self.settings
        model, classifier = self.networks.eval_model, self.networks.classifier
        model.eval()
        classifier.eval()
        generator = torch.Generator().manual_seed(epoch_seed(cfg.train.seed, 0, "validation"))
        means = _Means()
        table = ContextTable(self.vocabularies, self.store.n_genes, self.device)
        fields = self.vocabularies.fields
        first_batch = True
        rows_gen = torch.Generator().manual_seed(epoch_seed(cfg.train.seed, 0, "validation_rows"))
        windows = windows_of(self.eval_loader, self.eval_windows)
        batches = (b for w in windows for b in self._batches(w, self.eval_rows, rows_gen))
        for batch in batches:
            x, source, host_source, n = batch.x, batch.contexts, batch.host_contexts, len(batch.x)
            target = to_device(sample_targets(host_source, self.sizes, generator), self.device)
            weights = cfg.train.weights
            with self._autocast():
                passes = FusedPasses(model)(
                    x, source, target, moved_contexts(source, target, weights)
                )
                residual = cfg.model.counterfactual == "residual"
                losses = generator_losses(
                    passes, classifier, x, source, target, weights, residual, self.reference,
                    batch.library,
                )  # fmt: skip
                own = model(x, source)  # every head's term: contributions and effects
                logits = classifier(x)
                c_loss = classifier_loss(logits, source)
                correct, labelled = classifier_hits(logits, source)
                target_logits = classifier(passes.cycle1)
            for name, value in losses.terms().items():
                means.add(name, value * n, n)
            means.add("classifier", c_loss * n, n)
            for i, name in enumerate(fields):
                means.add(f"accuracy/{name}", correct[i], labelled[i])
                hits = (target_logits[i].argmax(dim=1) == target[:, i]).sum()
                means.add(f"target_accuracy/{name}", hits, n)
            if first_batch:
                self.head_samples = {"base": own.base.float().cpu()}
                self.head_samples.update({f: v.float().cpu() for f, v in own.fields.items()})
                first_batch = False
            norms = contribution_l2(own)
            for head, values in norms.items():
                means.add(f"contrib_l2/{head}", values.sum(), n)
            table.add(source, norms, model.field_effects(own))
        return self._evaluation_metrics(means, table)

    def _evaluation_metrics(
        self, means: _Means, table: ContextTable
    ) -> tuple[dict[str, float], pd.DataFrame]:
        """An evaluation's metrics (losses and accuracies under ``val/`` or ``eval/``, every
        head's contribution and share, every field's effect) and its per-context table."""
        raw = means.read("")
        metrics = {
            f"{self._eval_prefix}{k}": v for k, v in raw.items() if not k.startswith("contrib")
        }
        l2 = {k.removeprefix("contrib_l2/"): v for k, v in raw.items() if k.startswith("contrib")}
        total = sum(l2.values())
        for head, value in l2.items():
            metrics[f"contrib_l2/{head}"] = value
            metrics[f"contrib_share/{head}"] = value / total if total else 0.0
        distributed.all_reduce_sum(table.tensors())
        per_context = table.frame()
        for field, value in field_means(per_context, "effect_l2").items():
            metrics[f"effect_l2/{field}"] = value
        return metrics, per_context

    def _log_epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        if not self.ranks.is_main:
            return
        heads = ["base", *self.vocabularies.fields]
        shares = " ".join(f"{h} {metrics.get(f'contrib_share/{h}', 0):.3f}" for h in heads)
        val_key = "val/reconstruction" if "val/reconstruction" in metrics else "eval/reconstruction"
        log.info(
            "epoch %d/%d  train loss %.4f  %s %.4f  shares: %s  (%.1fs)",
            epoch,
            self.settings.train.epochs,
            metrics["train/loss"],
            val_key,
            metrics.get(val_key, float("nan")),
            shares,
            metrics["time/epoch_seconds"],
        )

    def _write_static_files(self) -> None:
        if not self.ranks.is_main:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        settings_json = json.dumps(self.settings.model_dump(mode="json"), indent=1)
        (self.out_dir / "settings.json").write_text(settings_json + "\n")
        (self.out_dir / "genes.txt").write_text("\n".join(self.store.genes) + "\n")
        save_preprocessed(self.out_dir, self.field_specs)

    def _save_partial(
        self,
        epoch: int,
        windows_done: int,
        rows_gen: torch.Generator,
        target_gen: torch.Generator,
        means: _Means,
    ) -> None:
        """A mid-epoch checkpoint: everything needed to replay the rest of the epoch exactly (the
        windows are the epoch order's, so the ones done and the generators' states suffice)."""
        counts = {k: torch.as_tensor(v) for k, v in means.counts.items()}
        state = rows_gen.get_state(), target_gen.get_state()
        partial = PartialEpoch(epoch, windows_done, *state, means.sums, counts)
        self._save(epoch - 1, partial)
        log.warning("%s: checkpoint written after window %d of epoch %d", self.stop_signal,
                    windows_done, epoch)  # fmt: skip

    def _save(self, epoch: int, partial: PartialEpoch | None = None) -> None:
        if not self.ranks.is_main:
            return
        networks = self.networks
        Checkpoint(
            epoch,
            networks.model.state_dict(),
            None if networks.averaged is None else networks.averaged.state_dict(),
            networks.classifier.state_dict(),
            self.optimizer.state_dict(),
            self.classifier_optimizer.state_dict(),
            self.settings,
            self.vocabularies,
            self.field_specs,
            self.store.genes,
            self.history,
            self.fingerprint,
            partial,
        ).write(self.checkpoint_path)
        with atomic_write(self.out_dir / "history.json") as file:
            file.write((json.dumps(self.history, indent=1) + "\n").encode())
        if self.folder is not None:
            self.folder.commit()


class _SignalGuard:
    """While training runs in the main thread, SIGTERM and SIGUSR1 (SLURM's warning before a
    time limit or preemption) ask it to stop at the next window boundary instead of dying."""

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer
        # each signal's handler before: as signal.signal returns it and takes it back
        self.previous: dict[int, Callable[[int, FrameType | None], Any] | int | None] = {}

    def __enter__(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for number in STOP_SIGNALS:
            self.previous[number] = signal.signal(number, self._handle)

    def _handle(self, number: int, frame: object) -> None:
        self.trainer.stop_signal = signal.Signals(number).name

    def __exit__(self, *exc: object) -> None:
        for number, handler in self.previous.items():
            # None: the handler was not set from Python (an embedded interpreter); the default
            # is the nearest one signal.signal takes back
            signal.signal(number, signal.SIG_DFL if handler is None else handler)


def resume_settings(settings: Settings, given: Iterable[str]) -> Settings:
    """The settings a resumed training goes on with: the data and model settings and the moving
    average (``train.ema``) of the checkpoint in ``settings.output.dir``, everything else
    (epochs, learning rate, tracking) as given, so that a resume without ``--data`` trains on
    the checkpoint's data, not the default.

    Args:
        settings: the settings as given for the resume.
        given: the dotted names the user set explicitly (flags), e.g. ``data.path``.

    Returns:
        ``settings`` with the checkpoint's ``data`` and ``model`` sections and ``train.ema``
        (unless given).

    Raises:
        ConfigError: no ``output.dir``, or a given data or model setting differs from the
            checkpoint's (the message names both values).
        CheckpointError: the folder holds no checkpoint.
    """
    if settings.output.dir is None:
        raise ConfigError("--resume needs --out: the folder of the training to continue")
    clean_training_leftovers(Path(settings.output.dir))
    path = Path(settings.output.dir) / CHECKPOINT
    if not path.is_file():
        raise CheckpointError(
            f"cannot resume: no checkpoint at {path}; pass the --out folder of the training to "
            "continue"
        )
    saved = Checkpoint.read(path).settings
    for key in given:
        section, _, name = key.partition(".")
        if section not in ("data", "model"):
            continue
        mine = getattr(getattr(settings, section), name)
        theirs = getattr(getattr(saved, section), name)
        if _same_place(mine, theirs) if key == "data.path" else mine == theirs:
            continue
        raise ConfigError(
            f"--resume continues {path}, trained with {key} = {theirs!r}, but {mine!r} was "
            "given; leave the flag out to go on as it was, or train anew into another --out"
        )
    # the moving average goes on as it was begun (a resume cannot start or stop it)
    train = settings.train
    if "train.ema" not in given:
        train = train.model_copy(update={"ema": saved.train.ema})
    return settings.model_copy(update={"data": saved.data, "model": saved.model, "train": train})


def _same_place(a: str, b: str) -> bool:
    """Whether two data paths name the same data (as text, or as local paths resolved)."""
    return a == b or (not is_soma_uri(a) and Path(a).resolve() == Path(b).resolve())


def train(
    settings: Settings, callbacks: Sequence[Callback] = (), store: DataStore | None = None
) -> TrainResult:
    """Train a CAE: the one training path shared by the CLI, MLproject, tuning and the Python
    API.

    Args:
        settings: every setting (see :mod:`cae.config`).
        callbacks: receivers of training events (tracking, progress, pruning).
        store: the cells, already open (:meth:`DataStore.from_anndata`); None opens
            ``data.path``.

    Returns:
        The :class:`TrainResult` (output folder, checkpoint, per-epoch history, contributions).

    Raises:
        CAEError: bad data or settings (a message naming the file, field or value), an output
            folder that would be overwritten, or a non-finite loss.
    """
    ranks = distributed.ranks_from_environment()
    if settings.output.dir is None:  # resolved once: it names the folder that is locked
        output = settings.output.model_copy(update={"dir": default_out_dir(settings)})
        settings = settings.model_copy(update={"output": output})
    assert settings.output.dir is not None
    try:
        if not ranks.is_main:  # the first process writes; the others train beside it
            return Trainer(settings, callbacks, store=store).fit()
        with TrainingFolder(settings.output.dir, overwrite=settings.output.overwrite) as folder:
            return Trainer(settings, callbacks, folder, store).fit()
    finally:
        if ranks.enabled:
            distributed.stop()
