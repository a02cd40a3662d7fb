"""Checkpoints: atomic writes, safe loads, and the trained model they hold.

A checkpoint is one ``torch.save`` file with only tensors and plain containers, so it loads with
``torch.load(weights_only=True)``: model and classifier weights, both optimisers, the vocabularies,
field specs, settings, gene names, epoch and metric history. A model never needs the data or
preprocessing folder it was trained from.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from cae.config import Settings, settings_from_dict
from cae.data.atomic import atomic_write
from cae.data.loader import apply_transform
from cae.data.vocabulary import UNK, FieldSpec, Vocabularies
from cae.errors import CheckpointError, DataError, MetadataError
from cae.model.cae import CAE, CAEOutput
from cae.model.classifier import ContextClassifier

# Format 2 (issue 9): the autoencoder's optimiser is ContextAdam (per-category step counts for the
# context maps). Format 1 checkpoints still load for inference (same model keys); they cannot be
# resumed, since their optimiser state is plain Adam's.
CHECKPOINT_FORMAT = 2
READABLE_FORMATS = (1, 2)


def save_checkpoint(path: Path, payload: Mapping[str, Any]) -> None:
    """Write ``payload`` to ``path`` atomically: a temporary file in the same folder, fsync'd, then
    renamed over the old one, so an interrupted write never corrupts the previous checkpoint."""
    with atomic_write(path) as file:
        torch.save(dict(payload), file)


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint's raw contents with ``weights_only=True`` (no code runs on load).

    Raises:
        CheckpointError: the file is missing, unreadable or not a CAE checkpoint.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "checkpoints" / "last.pt"
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}; give a .pt file or a training folder")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several kinds for truncated or foreign files
        raise CheckpointError(f"cannot read checkpoint {path}: {err}") from None
    if not isinstance(payload, dict) or payload.get("format") not in READABLE_FORMATS:
        raise CheckpointError(f"{path} is not a CAE checkpoint (format {CHECKPOINT_FORMAT})")
    return payload


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
            source: each cell's context values, one entry per model field.
            targets: new values for some fields (one value for all cells, or one per cell); fields
                not named keep their source value.

        Returns:
            The model's :class:`CAEOutput` in model space (log1p counts per 10,000 for
            ``log1p_cp10k``): ``output`` is the counterfactual expression, ``fields`` and ``base``
            each head's contribution.

        Raises:
            MetadataError: unknown fields or values in ``source`` or ``targets``.
            DataError: a value of ``x`` is not finite, negative or above ``serve.max_value``.
            ValueError: ``x`` does not have the model's gene count.
        """
        dense = x.toarray() if sp.issparse(x) else x
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
        target_index = self.encode_targets(source_index, targets)
        x_model = apply_transform(tensor.to(device), self.settings.data.transform)
        self.model.eval()
        residual = self.settings.model.counterfactual == "residual"
        return self.model.counterfactual(
            x_model, source_index.to(device), target_index.to(device), residual
        )


def build_networks(
    settings: Settings, n_genes: int, sizes: dict[str, int]
) -> tuple[CAE, ContextClassifier]:
    """Create the autoencoder and classifier for these settings, genes and vocabulary sizes."""
    model = CAE(
        n_genes,
        settings.model.latent_dim,
        sizes,
        settings.model.logit_scale,
        settings.model.context_offsets,
        settings.model.nonnegative,
    )
    classifier = ContextClassifier(n_genes, settings.model.classifier_hidden, sizes)
    return model, classifier


def inference_weights(payload: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The autoencoder's state dict to predict with: the moving average of its weights when the
    checkpoint has one (``train.ema``), else the last step's weights."""
    averaged = payload.get("averaged")
    if averaged is None:
        return payload["model"]
    prefix = "module."
    return {k.removeprefix(prefix): v for k, v in averaged.items() if k.startswith(prefix)}


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> TrainedModel:
    """Load a trained model from a checkpoint file or a training output folder.

    Args:
        path: ``.../checkpoints/last.pt`` or the training folder holding it.
        device: where the networks go.

    Returns:
        The :class:`TrainedModel`, in eval mode.

    Raises:
        CheckpointError: the file is missing, unreadable, or not a CAE checkpoint.
    """
    payload = read_checkpoint(path)
    settings = settings_from_dict(payload["settings"], str(path))
    vocabularies = Vocabularies.from_dict(payload["vocabularies"])
    specs = {d["field"]: FieldSpec.from_dict(d) for d in payload["field_specs"]}
    model, classifier = build_networks(settings, len(payload["genes"]), vocabularies.sizes())
    model.load_state_dict(inference_weights(payload))
    classifier.load_state_dict(payload["classifier"])
    model.to(device).eval()
    classifier.to(device).eval()
    return TrainedModel(
        model,
        classifier,
        vocabularies,
        specs,
        settings,
        list(payload["genes"]),
        int(payload["epoch"]),
        list(payload.get("history", [])),
    )
