"""Checkpoints: their contents (:class:`Checkpoint`, the one place that knows the file's keys),
atomic writes, safe loads, and the trained model they hold.

A checkpoint is one ``torch.save`` file with only tensors and plain containers, so it loads with
``torch.load(weights_only=True)``: model and classifier weights, both optimisers, the vocabularies,
field specs, settings, gene names, epoch and metric history, and where a preempted epoch stopped.
A model never needs the data or preprocessing folder it was trained from.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, cast

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from cae import __version__
from cae.config import CheckpointChoice, Settings, settings_from_dict
from cae.data.atomic import atomic_write
from cae.data.loader import cell_totals, transform_with_library
from cae.data.vocabulary import UNK, FieldSpec, Vocabularies
from cae.errors import CheckpointError, ConfigError, DataError, MetadataError
from cae.model.cae import CAE, CAEOutput
from cae.model.classifier import ContextClassifier
from cae.model.likelihood import (
    counts_from_expression,
    median_ratio,
    round_counts,
    round_log_counts,
    sample_counts,
)
from cae.train.folder import BEST_CHECKPOINT, CHECKPOINT
from cae.train.networks import build_networks

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 2  # format 1 (plain Adam's optimiser state) is not read


def save_checkpoint(path: Path, payload: Mapping[str, Any]) -> None:
    """Write ``payload`` to ``path`` atomically: a temporary file in the same folder, fsync'd, then
    renamed over the old one, so an interrupted write never corrupts the previous checkpoint."""
    with atomic_write(path) as file:
        torch.save(dict(payload), file)


def copy_checkpoint(source: Path, target: Path) -> None:
    """Copy the checkpoint file ``source`` to ``target`` atomically (``best.pt`` from ``last.pt``):
    a reader of ``target`` sees the previous copy or the new one, never half of either."""
    with source.open("rb") as original, atomic_write(target) as copy:
        shutil.copyfileobj(original, copy, length=16 << 20)


def checkpoint_file(path: str | Path, which: CheckpointChoice = "last") -> Path:
    """The checkpoint file ``path`` names: itself, or a training folder's ``last`` or ``best``
    checkpoint (checkpoints/last.pt, checkpoints/best.pt; which may not exist)."""
    path = Path(path)
    if not path.is_dir():
        return path
    return path / (BEST_CHECKPOINT if which == "best" else CHECKPOINT)


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint's raw contents with ``weights_only=True`` (no code runs on load).

    Args:
        path: a ``.pt`` file, or a training folder (its ``checkpoints/last.pt``).

    Returns:
        The payload, keyed as :meth:`Checkpoint.payload` writes it.

    Raises:
        CheckpointError: the file is missing, unreadable, not a CAE checkpoint, or of a format
            this version does not read.
    """
    path = checkpoint_file(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}; give a .pt file or a training folder")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several kinds for truncated or foreign files
        raise CheckpointError(f"cannot read checkpoint {path}: {err}") from None
    found = payload.get("format") if isinstance(payload, dict) else None
    if found == 1:
        raise CheckpointError(
            f"{path} was written by an older cae (checkpoint format 1), which this version does "
            "not read; train the model again"
        )
    if found != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a CAE checkpoint (format {CHECKPOINT_FORMAT})")
    return payload


@dataclass
class PartialEpoch:
    """Where a training stopped mid-epoch (preempted): enough to replay the rest of the epoch
    exactly, since its windows are the epoch order's."""

    epoch: int  # the epoch that goes on
    windows_done: int  # its shuffle windows already trained
    # The epoch's generators of batch rows and targets after those windows; None: the epoch's
    # own seeds (it starts again).
    rows_generator: torch.Tensor | None
    target_generator: torch.Tensor | None
    sums: dict[str, torch.Tensor]  # the epoch's running metric sums and counts
    counts: dict[str, torch.Tensor]

    def to_dict(self) -> dict[str, Any]:
        """The checkpoint's ``partial`` entry."""
        return {
            "epoch": self.epoch,
            "windows_done": self.windows_done,
            "rows_generator": self.rows_generator,
            "target_generator": self.target_generator,
            "sums": self.sums,
            "counts": self.counts,
        }

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], source: str) -> PartialEpoch:
        """Read a checkpoint's ``partial`` entry; one without ``windows_done`` (no shuffle
        windows to replay) cannot be replayed: its epoch starts again."""
        epoch = int(values["epoch"])
        if "windows_done" not in values:
            log.warning("%s stopped mid-epoch %d under an older cae: that epoch starts again",
                        source, epoch)  # fmt: skip
            return cls(epoch, 0, None, None, {}, {})
        return cls(
            epoch,
            int(values["windows_done"]),
            values["rows_generator"],
            values["target_generator"],
            dict(values["sums"]),
            dict(values["counts"]),
        )


@dataclass
class Checkpoint:
    """Everything one checkpoint file holds; the only code that knows its keys.

    The file holds only tensors and plain containers, so it loads with ``weights_only=True``.
    """

    epoch: int  # epochs completed
    model: dict[str, torch.Tensor]  # the autoencoder's weights after the last step
    # train.ema: the AveragedModel's state (the average, what inference loads), else None.
    averaged: dict[str, torch.Tensor] | None
    classifier: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    classifier_optimizer: dict[str, Any]
    settings: Settings
    vocabularies: Vocabularies
    field_specs: dict[str, FieldSpec]
    genes: list[str]
    history: list[dict[str, float]]  # one metrics dict per epoch
    data_fingerprint: str | None
    partial: PartialEpoch | None = None

    def payload(self) -> dict[str, Any]:
        """The dict the file holds (what :func:`read_checkpoint` returns)."""
        return {
            "format": CHECKPOINT_FORMAT,
            "version": __version__,
            "epoch": self.epoch,
            "model": self.model,
            "averaged": self.averaged,
            "classifier": self.classifier,
            "optimizer": self.optimizer,
            "classifier_optimizer": self.classifier_optimizer,
            "settings": self.settings.model_dump(mode="json"),
            "vocabularies": self.vocabularies.to_dict(),
            "field_specs": [spec.to_dict() for spec in self.field_specs.values()],
            "genes": self.genes,
            "history": self.history,
            "data_fingerprint": self.data_fingerprint,
            "partial": None if self.partial is None else self.partial.to_dict(),
        }

    def write(self, path: Path) -> None:
        """Write the checkpoint to ``path`` atomically (see :func:`save_checkpoint`)."""
        save_checkpoint(path, self.payload())

    @classmethod
    def read(cls, path: str | Path) -> Checkpoint:
        """Read a checkpoint file or a training folder's checkpoint.

        Raises:
            CheckpointError: see :func:`read_checkpoint`; or an entry is missing.
            ConfigError: the saved settings do not validate.
        """
        payload = read_checkpoint(path)
        try:
            partial = payload.get("partial")
            return cls(
                int(payload["epoch"]),
                payload["model"],
                payload.get("averaged"),
                payload["classifier"],
                payload["optimizer"],
                payload["classifier_optimizer"],
                settings_from_dict(payload["settings"], str(path)),
                Vocabularies.from_dict(payload["vocabularies"]),
                {d["field"]: FieldSpec.from_dict(d) for d in payload["field_specs"]},
                list(payload["genes"]),
                list(payload.get("history", [])),
                payload.get("data_fingerprint"),
                None if partial is None else PartialEpoch.from_dict(partial, str(path)),
            )
        except KeyError as err:
            raise CheckpointError(
                f"{path} has no {err} entry; it is not a whole checkpoint"
            ) from None

    def inference_weights(self) -> dict[str, torch.Tensor]:
        """The autoencoder's state dict to predict with: the moving average of its weights when
        the checkpoint has one (``train.ema``), else the last step's weights."""
        if self.averaged is None:
            return self.model
        prefix = "module."
        return {k.removeprefix(prefix): v for k, v in self.averaged.items() if k.startswith(prefix)}


class PreparedCells(NamedTuple):
    """Cells checked and turned into what the networks take (:meth:`TrainedModel.prepare`)."""

    x_model: torch.Tensor  # (n, G) model-space expression on the model's device
    source_index: torch.Tensor  # (n, F) the source categories, on the host
    # (n, 1) library sizes (total counts) beside x_model under log1p_cp10k; None for values
    # used as stored
    library: torch.Tensor | None
    # (n, G) the cells' counts as given, on the model's device, under log1p_cp10k (None for
    # values used as stored): exact, where x_model carries float rounding
    counts: torch.Tensor | None = None


@dataclass
class TrainedModel:
    """A trained CAE and everything needed to use it: vocabularies, specs, genes, settings."""

    model: CAE
    classifier: ContextClassifier
    vocabularies: Vocabularies
    field_specs: dict[str, FieldSpec]
    settings: Settings
    genes: list[str]
    epoch: int
    history: list[dict[str, float]] = field(default_factory=list)
    checkpoint: Path | None = None  # the file it was loaded from
    origin: str | None = None  # what it was loaded by: a path, or a models:/ URI

    @property
    def metadata_columns(self) -> list[str]:
        """The metadata every cell sent to the model carries: its fields and, with
        ``data.library_key``, the column of each cell's total counts."""
        key = self.settings.data.library_key
        return [*self.vocabularies.fields, *([] if key is None else [key])]

    def _library(
        self, source: pd.DataFrame | Mapping[str, Any], counts: torch.Tensor
    ) -> torch.Tensor | None:
        """(n, 1) each cell's total from ``source``'s ``data.library_key`` column (None without
        one: the counts' own sums)."""
        key = self.settings.data.library_key
        if key is None:
            return None
        if key not in source:
            raise MetadataError(
                f"no column '{key}' in the source cells: this model normalises each cell by its "
                f"total counts over all its genes (data.library_key = '{key}'); send it with "
                f"the cells, beside {', '.join(self.vocabularies.fields)}"
            )
        values = np.asarray(source[key], dtype=object)
        if values.ndim == 0:  # one total for every cell, as a field may give one value
            values = np.full(counts.shape[0], values.item(), dtype=object)
        if values.shape != (counts.shape[0],):
            raise MetadataError(
                f"column '{key}' has {values.size:,} values for {counts.shape[0]:,} cells"
            )
        totals = cell_totals(values, counts.sum(dim=1).cpu().numpy(), f"column '{key}'")
        return torch.from_numpy(totals)[:, None]

    def encode_contexts(
        self, contexts: pd.DataFrame | Mapping[str, Sequence[str] | str], n_cells: int
    ) -> torch.Tensor:
        """Turn context *values* into the (n_cells, F) index tensor the model takes.

        Args:
            contexts: one column (or list, or single value for every cell) per model field.
            n_cells: number of cells.

        Raises:
            MetadataError: a field is missing or a value is not in the training vocabulary (the
                message lists the known values).
        """
        columns = {}
        for name in self.vocabularies.fields:
            if name not in contexts:
                raise MetadataError(
                    f"no source context for field '{name}'; the model needs values for "
                    f"{', '.join(self.vocabularies.fields)}"
                )
            value = contexts[name]
            columns[name] = [value] * n_cells if isinstance(value, str) else list(value)
            if len(columns[name]) != n_cells:
                raise MetadataError(
                    f"field '{name}' has {len(columns[name]):,} values for {n_cells:,} cells"
                )
        frame = pd.DataFrame(columns)
        null_values = self.settings.data.null_values
        encoded = self.vocabularies.encode(frame, null_values, source="the source contexts")
        return torch.from_numpy(encoded)

    def encode_targets(
        self, source: torch.Tensor, targets: Mapping[str, str | Sequence[str]]
    ) -> torch.Tensor:
        """Replace the source categories of the fields named in ``targets``.

        Raises:
            MetadataError: a target names an unknown field or value, or ``<unk>``.
        """
        target = source.clone()
        for name, value in targets.items():
            if name not in self.vocabularies.fields:
                raise MetadataError(
                    f"target field '{name}' is not one the model was trained on; its fields: "
                    f"{', '.join(self.vocabularies.fields)}"
                )
            values = [value] * len(source) if isinstance(value, str) else list(value)
            vocab = self.vocabularies.by_field[name]
            if UNK in values:
                raise MetadataError(
                    f"'{UNK}' cannot be a target of '{name}'; pick one of {vocab.values}"
                )
            try:
                index = vocab.encode_values(values, source=f"the targets of '{name}'")
            except MetadataError:
                unseen = [v for v in dict.fromkeys(values) if v not in vocab.values]
                raise MetadataError(
                    f"target {name}={unseen[0]!r} is not a value the model was trained on; pick "
                    f"one of {', '.join(map(repr, vocab.values))}"
                ) from None
            if (index == 0).any():
                raise MetadataError(
                    f"a target of '{name}' is a null value; pick one of {', '.join(vocab.values)}"
                )
            target[:, self.vocabularies.fields.index(name)] = torch.from_numpy(index)
        return target

    @torch.no_grad()
    def counterfactual(
        self,
        x: np.ndarray | sp.spmatrix | torch.Tensor,
        source: pd.DataFrame | Mapping[str, Sequence[str] | str],
        targets: Mapping[str, str | Sequence[str]],
    ) -> CAEOutput:
        """Move cells to other contexts.

        Args:
            x: (n, G) expression in the units the model was trained on (raw counts for
                ``log1p_cp10k``), genes in the model's order (:attr:`genes`).
            source: each cell's context values, one entry per model field, and with
                ``data.library_key`` each cell's total counts over all its genes (that column).
            targets: new values for some fields (one value for all cells, or one per cell); fields
                not named keep their source value.

        Returns:
            The model's :class:`CAEOutput` in model space (log1p counts per 10,000 for
            ``log1p_cp10k``): ``output`` is the counterfactual expression, ``fields`` and ``base``
            each head's contribution.

        Raises:
            MetadataError: unknown fields or values in ``source`` or ``targets``, or no total
                (``data.library_key``) for each cell.
            DataError: a value of ``x`` is not finite, negative or above ``serve.max_value``, or
                a total is not a number at least the cell's sum over the model's genes.
            ValueError: ``x`` does not have the model's gene count.
        """
        cells = self.prepare(x, source)
        return self.move(cells.x_model, cells.source_index, targets)

    @torch.no_grad()
    def move(
        self,
        x_model: torch.Tensor,
        source_index: torch.Tensor,
        targets: Mapping[str, str | Sequence[str]],
    ) -> CAEOutput:
        """:meth:`counterfactual` of cells already through :meth:`prepare`."""
        target_index = self.encode_targets(source_index, targets)
        residual = self.settings.model.counterfactual == "residual"
        return self.model.counterfactual(
            x_model, source_index.to(x_model.device), target_index.to(x_model.device), residual
        )

    @torch.no_grad()
    def reconstruct(
        self,
        x: np.ndarray | sp.spmatrix | torch.Tensor,
        source: pd.DataFrame | Mapping[str, Sequence[str] | str],
    ) -> CAEOutput:
        """Pass cells through the model in their own contexts.

        Args:
            x: as for :meth:`counterfactual`.
            source: as for :meth:`counterfactual`.

        Returns:
            The :class:`CAEOutput` decoded in the source contexts: ``output`` the reconstruction
            (model space), ``base_hidden`` and ``field_hidden`` every head's latent.

        Raises:
            As :meth:`counterfactual`.
        """
        cells = self.prepare(x, source)
        return self.model(cells.x_model, cells.source_index.to(cells.x_model.device))

    def prepare(
        self,
        x: np.ndarray | sp.spmatrix | torch.Tensor,
        source: pd.DataFrame | Mapping[str, Sequence[str] | str],
    ) -> PreparedCells:
        """Check cells and turn them into what the networks take.

        Returns:
            The :class:`PreparedCells`.

        Raises:
            As :meth:`counterfactual`.
        """
        # (scipy has no types, so issparse does not narrow x for the checker)
        dense = cast(Any, x).toarray() if sp.issparse(x) else x
        tensor = torch.as_tensor(dense, dtype=torch.float32)
        if tensor.ndim != 2 or tensor.shape[1] != len(self.genes):
            raise ValueError(f"x must be (cells, {len(self.genes)}) but is {tuple(tensor.shape)}")
        limit = self.settings.serve.max_value
        refused = ~(torch.isfinite(tensor) & (tensor >= 0) & (tensor <= limit))
        if refused.any():
            row, column = divmod(int(refused.flatten().nonzero()[0]), tensor.shape[1])
            raise DataError(
                f"x holds {tensor[row, column].item()} for gene {self.genes[column]!r} in row "
                f"{row}; expression must be finite, >= 0 and <= {limit:g} (serve.max_value): "
                "counts, or the normalised values the model was trained on"
            )
        device = next(self.model.parameters()).device
        source_index = self.encode_contexts(source, tensor.shape[0])
        self.model.eval()
        tensor = tensor.to(device)
        totals = self._library(source, tensor)
        x_model, library = transform_with_library(tensor, self.settings.data.transform, totals)
        return PreparedCells(x_model, source_index, library, None if library is None else tensor)

    @torch.no_grad()
    def sample_counts(
        self,
        cells: PreparedCells,
        out: CAEOutput,
        seed: int,
        library: torch.Tensor | None = None,
        moved: bool = True,
    ) -> torch.Tensor:
        """Whole counts for a pass of ``cells``.

        A residual counterfactual (``model.counterfactual = "residual"``, ``moved``) is the cell
        plus the move, so its counts are the cell's own counts moved to the counterfactual's
        mean with the least added noise: the noise the cell already holds is not drawn again,
        a gene the move leaves alone keeps its count, and a cell it leaves alone comes back as
        given. The mean kept is the one the likelihood models:

        - normal (a mean of log-normalised values): each gene's count is rounded on the log
          scale (:func:`cae.model.likelihood.round_log_counts`), so the counts' log1p counts per
          10,000 at the cell's depth (or at ``library``) average to the counterfactual;
        - nb (a mean count): each gene's mean count is rounded
          (:func:`cae.model.likelihood.round_counts`). Model space is counts per 10,000, so a
          move that raises some genes lowers the share of all others; at the cell's depth the
          mean is scaled so that the cell's typical expressed gene keeps its count
          (:func:`cae.model.likelihood.median_ratio`), as real cells keep the genes a stimulus
          does not touch and grow by what it adds.

        A decoded pass (the decode design, or a reconstruction) is a new cell: its counts are
        drawn around its mean from the model's negative binomial
        (:func:`cae.model.likelihood.sample_counts`), which only the count likelihood has.

        Args:
            cells: from :meth:`prepare`, under ``data.transform = "log1p_cp10k"`` (the counts).
            out: a pass of these cells: :meth:`move`'s counterfactual, or a decoded pass.
            seed: the draws' seed.
            library: (n, 1) the depth to give each cell: the total its counts are normalised by
                (normal; their total is then about that), or the total it is drawn with (nb);
                None: the source cell's depth (a moved cell's total then changes by what the
                move adds or removes; a decoded cell is drawn with the source cell's total).
                :class:`cae.generate.Sampling` checks a size given.
            moved: ``out`` is :meth:`move`'s counterfactual (False: a decoded pass).

        Returns:
            (n, G) float32 whole counts on the model's device.

        Raises:
            ConfigError: as :meth:`check_sampling` says.
        """
        self.check_sampling(moved)
        # (check_sampling: log1p_cp10k, so prepare gave the library sizes and counts)
        source_library = cast(torch.Tensor, cells.library)
        if not self._keeps_cell(moved):
            drawn_with = source_library if library is None else library
            log_theta = cast(torch.Tensor, self.model.log_theta)  # (check_sampling: nb)
            return sample_counts(out.output, drawn_with, log_theta, seed)
        normal = self.settings.model.likelihood == "normal"
        if normal and library is not None:
            return round_log_counts(
                counts_from_expression(out.output.double(), library), library, seed
            )
        counts = cast(torch.Tensor, cells.counts).double().round()
        # the cell's counts plus the move's change: exactly the cell's where nothing moved
        change = counts_from_expression(out.output.double(), source_library) - (
            counts_from_expression(cells.x_model.double(), source_library)
        )
        mean = (counts + change).clamp_min(0.0)
        if normal:
            return round_log_counts(mean, source_library, seed)
        if library is None:  # the cell's depth: its typical expressed gene keeps its count
            mean = mean / median_ratio(mean, counts)
        else:
            mean = mean * (library / mean.sum(dim=1, keepdim=True).clamp_min(1e-30))
        return round_counts(mean, seed)

    def _keeps_cell(self, moved: bool) -> bool:
        """Whether counts of such a pass keep the cell: a residual counterfactual."""
        return moved and self.settings.model.counterfactual == "residual"

    def check_sampling(self, moved: bool = True) -> None:
        """Refuse to draw counts this model cannot give (:meth:`sample_counts`).

        Args:
            moved: counts of counterfactuals (False: of decoded passes, e.g. reconstructions).

        Raises:
            ConfigError: :meth:`sampling_refusal`'s reason, when there is one.
        """
        reason = self.sampling_refusal(moved)
        if reason is not None:
            raise ConfigError(reason)

    def sampling_refusal(self, moved: bool = True) -> str | None:
        """Why this model cannot draw counts of such passes, or None when it can.

        It cannot when it does not read counts (``data.transform = "none"``: the cells' total
        counts are unknown), or, for a pass that does not keep the cell (a reconstruction, or
        the decode design), when it was trained with the normal likelihood (it has no dispersion
        to draw with). The reason says what to do.

        Args:
            moved: counts of counterfactuals (False: of decoded passes, e.g. reconstructions).
        """
        transform = self.settings.data.transform
        if transform != "log1p_cp10k":
            return (
                "sampled counts need a model that reads counts (data.transform=log1p_cp10k); this "
                f"one reads values as stored (data.transform={transform}), so the cells' total "
                "counts are unknown: use its mean output, or retrain it on raw counts"
            )
        if self.model.log_theta is None and not self._keeps_cell(moved):
            return (
                "sampled counts of a decoded pass (a reconstruction, or a counterfactual under "
                "model.counterfactual=decode) are drawn from the count likelihood, and this model "
                "was trained with model.likelihood=normal: give targets to a model with "
                "model.counterfactual=residual, use the mean output, or retrain with "
                "model.likelihood=nb (CAE_MODEL__LIKELIHOOD=nb cae train ..., or "
                'likelihood = "nb" under [model] in the --config file)'
            )
        return None


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> TrainedModel:
    """Load a trained model from a checkpoint file or a training output folder.

    Args:
        path: ``.../checkpoints/last.pt`` or the training folder holding it.
        device: where the networks go.

    Returns:
        The :class:`TrainedModel`, in eval mode.

    Raises:
        CheckpointError: the file is missing, unreadable, or not a CAE checkpoint.
        ConfigError: the saved settings do not validate.
    """
    file = checkpoint_file(path)
    saved = Checkpoint.read(file)
    model, classifier = build_networks(saved.settings, len(saved.genes), saved.vocabularies.sizes())
    model.load_state_dict(saved.inference_weights())
    classifier.load_state_dict(saved.classifier)
    model.to(device).eval()
    classifier.to(device).eval()
    return TrainedModel(
        model,
        classifier,
        saved.vocabularies,
        saved.field_specs,
        saved.settings,
        saved.genes,
        saved.epoch,
        saved.history,
        checkpoint=file,
        origin=str(file.resolve()),
    )
