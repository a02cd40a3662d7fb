"""The Python API, in scvi-tools' shape: set up an AnnData in memory, train, predict, save, load.

::

    import cae

    cae.CAE.setup_anndata(adata, fields=["cell_type", "sex"], layer="counts")
    model = cae.CAE(adata, overrides={"model.latent_dim": 16})
    model.train(epochs=15, out_dir="runs/py")  # progress and an MLflow run, as `cae train`
    moved = model.counterfactual(targets={"sex": "female"})  # an AnnData, the input's cells
    counts = model.counterfactual(targets={"sex": "female"}, sample=True, seed=1)  # nb models
    same = model.reconstruct()
    z = model.get_latent_representation()  # (cells, latent_dim)
    model = cae.CAE.load("runs/py")  # or "models:/NAME@alias"

The AnnData is read where it lies (row ranges of its ``X`` or layer, metadata from ``.obs``): no
file is written but the training folder and the MLflow run. Predictions are AnnData objects laid
out as ``cae generate`` writes them (:mod:`cae.generate`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cae.data.atomic import check_output_path
from cae.data.store import DataStore, check_cell_names, select_fields
from cae.errors import CheckpointError, ConfigError
from cae.generate import (
    INPUT_LAYER,
    RECONSTRUCTION_LAYER,
    generated_anndata,
    load_any_model,
    plan_generation,
    requested_sampling,
)

if TYPE_CHECKING:
    import anndata

    from cae.config import Settings
    from cae.train.checkpoint import TrainedModel
    from cae.train.trainer import TrainResult

SETUP_KEY = "cae_setup"  # adata.uns[SETUP_KEY]: what setup_anndata registered
PREDICT_CHUNK = 10_000  # cells moved at once by default


class CAE:
    """A context-conditioned cycle autoencoder trained on, and predicting for, AnnData objects.

    Args:
        adata: an AnnData set up with :meth:`setup_anndata` (needed to :meth:`train`; the
            default of every prediction).
        config: a TOML settings file (``experiments/demo.toml``); None for cae's defaults.
        overrides: dotted settings that win over the file, e.g. ``{"model.latent_dim": 16}``.

    Raises:
        ConfigError: ``adata`` was not set up.
    """

    def __init__(
        self,
        adata: anndata.AnnData | None = None,
        config: str | Path | None = None,
        overrides: Mapping[str, Any] | None = None,
    ) -> None:
        self.adata = adata
        self.setup = None if adata is None else _read_setup(adata)
        self.config = config
        self.overrides = dict(overrides or {})
        self.trained: TrainedModel | None = None  # after train() or load()
        self.result: TrainResult | None = None  # after train()
        self.run_id: str | None = None  # the MLflow run of train(), when tracked

    @classmethod
    def setup_anndata(
        cls,
        adata: anndata.AnnData,
        fields: Sequence[str],
        layer: str | None = None,
        genes: Sequence[str] | None = None,
        library_key: str | None = None,
    ) -> None:
        """Check an AnnData for training and register its fields, layer and genes in
        ``adata.uns["cae_setup"]`` (nothing else of it changes; nothing is copied or written).

        Args:
            adata: the cells, in memory; ``.obs`` holds the fields.
            fields: the ``.obs`` columns that condition the model, e.g. ``["cell_type", "sex"]``
                (or one comma-separated string).
            layer: the layer holding raw counts (for the default ``log1p_cp10k`` transform);
                None reads ``.X``.
            genes: the genes to train on, in this order; None for every gene.
            library_key: the ``.obs`` column of each cell's total counts over all its genes
                (``data.library_key``, scvi-tools' ``size_factor_key``), to normalise a subset
                of genes as the whole cell was; None: the sum over the genes trained on.

        Raises:
            DataError: ``adata`` is a view or backed, has no such layer, no cells, repeated or
                missing gene names, repeated cell names, or lacks some of ``genes``.
            MetadataError: ``.obs`` lacks a field or the library column (the message lists its
                columns).
        """
        if isinstance(fields, str):
            fields = [f.strip() for f in fields.split(",")]
        DataStore.from_anndata(adata, layer, genes)
        select_fields(
            adata.obs, [*fields, *([] if library_key is None else [library_key])], "adata.obs"
        )
        check_cell_names(adata.obs_names, "adata")
        adata.uns[SETUP_KEY] = {
            "fields": list(fields),
            "layer": layer,
            "genes": None if genes is None else list(genes),
            "library_key": library_key,
        }

    def settings(self, **values: Any) -> Settings:
        """The settings a training of this model takes: ``config``, then ``CAE_*`` variables,
        then ``overrides`` and the set-up's fields and layer, then ``values`` (dotted names)."""
        from cae.config import load_settings

        setup = self._require_setup()
        data = {"data.path": "AnnData", "data.fields": setup["fields"]}
        data["data.h5ad_layer"] = setup["layer"]
        data["data.library_key"] = setup["library_key"]
        return load_settings(self.config, {**self.overrides, **data, **values})

    def train(
        self,
        epochs: int | None = None,
        out_dir: str | Path | None = None,
        *,
        tracking: bool = True,
        tracking_uri: str | None = None,
        experiment: str | None = None,
        progress: bool = True,
        overwrite: bool = False,
    ) -> TrainResult:
        """Train on the set-up AnnData, as ``cae train`` does: progress bars and a line per
        epoch, an MLflow run and TensorBoard events unless ``tracking`` is False.

        Args:
            epochs: total epochs (None: the settings' ``train.epochs``).
            out_dir: the training folder (None: ``runs/<time>-<fields>``).
            tracking: record an MLflow run (``tracking.*`` settings).
            tracking_uri: where (None: ``MLFLOW_TRACKING_URI``, else ``./mlflow.db``).
            experiment: the MLflow experiment (None: ``tracking.experiment``, by default
                ``MLFLOW_EXPERIMENT_NAME``, else ``Default``).
            progress: progress bars, and the epoch lines when logging is not set up.
            overwrite: replace a training already in ``out_dir``.

        Returns:
            The :class:`~cae.train.TrainResult`; the trained model is then :attr:`trained`.

        Raises:
            CAEError: bad values in the AnnData (NaN, negative), unusable fields, a training
                that would be overwritten, or a tracking store that does not answer.
        """
        from cae.tracking.callbacks import run_id_of, tracked
        from cae.train.checkpoint import load_checkpoint
        from cae.train.trainer import train

        given = {"train.epochs": epochs, "output.dir": out_dir, "tracking.uri": tracking_uri,
                 "tracking.experiment": experiment}  # fmt: skip
        values = {k: v for k, v in given.items() if v is not None}
        values |= {"tracking.enabled": tracking, "train.progress": progress}
        values["output.overwrite"] = overwrite
        settings = self.settings(**values)
        setup = self._require_setup()
        assert self.adata is not None
        chunk = settings.data.h5ad_chunk_size
        store = DataStore.from_anndata(self.adata, setup["layer"], setup["genes"], chunk)
        with _epoch_lines(progress), tracked(settings) as callbacks:
            self.result = train(settings, callbacks, store)
        self.run_id = run_id_of(callbacks)
        self.trained = load_checkpoint(self.result.checkpoint)
        return self.result

    def counterfactual(
        self,
        adata: anndata.AnnData | None = None,
        targets: Mapping[str, str] | None = None,
        *,
        batch_size: int = PREDICT_CHUNK,
        layer: str | None = None,
        add_input: bool = False,
        add_reconstruction: bool = False,
        sample: bool = False,
        seed: int = 0,
        library_size: float | None = None,
    ) -> anndata.AnnData:
        """Move every cell to the target contexts; the mean, or whole counts.

        Args:
            adata: the cells (default: the set-up AnnData), in the units the model was trained
                on; the model's genes are matched by name.
            targets: ``{field: value}`` for the fields to change; others keep their source
                value. None or empty: the reconstruction.
            batch_size: cells moved at once.
            layer: the layer to read (default: the one the model was trained on; ``"X"`` for
                ``.X``).
            add_input: add the input in model space as layer ``cae_input``.
            add_reconstruction: add the reconstruction as layer ``cae_reconstruction``.
            sample: whole counts into ``.X`` instead of the mean (which goes to layer
                ``cae_mean``): under the residual design each cell's own counts moved to its
                counterfactual (either likelihood); a reconstruction, or the decode design, drawn
                from the negative binomial of a model trained with ``model.likelihood = "nb"``.
                The model must read counts (``data.transform = "log1p_cp10k"``).
            seed: the draws' seed, 0 to 2**63 - 1 (each ``batch_size`` block of cells draws with
                its own seed derived from it: the same seed and batch size give the same counts).
            library_size: the total counts every cell is drawn with, in mean (None: each cell's
                depth).

        Returns:
            An AnnData with ``adata``'s obs_names, ``.obs`` (plus ``source_<field>`` and
            ``target_<field>``) and ``.var`` (the model's genes, in its order); ``.X`` the
            counterfactual in model space (log1p counts per 10,000 under ``log1p_cp10k``), or with
            ``sample`` the drawn counts (float32 whole numbers); ``.uns["cae"]`` says what it
            holds (and the seed and library size of the draws), ``.uns["log1p"]`` marks log1p
            data as scanpy does.

        Raises:
            ConfigError: ``sample`` the model cannot draw (``TrainedModel.sampling_refusal``),
                a seed or library size that is not one (or given without ``sample``).
            DataError: missing genes, repeated cell names, NaN or negative values.
            MetadataError: an unknown field or value.
        """
        trained = self._require_trained()
        sampling = requested_sampling(sample, seed, library_size)
        store = self._store(adata, layer, batch_size)
        wanted = {INPUT_LAYER: add_input, RECONSTRUCTION_LAYER: add_reconstruction}
        layers = [name for name, asked in wanted.items() if asked]
        plan = plan_generation(trained, store, dict(targets or {}), layers, sampling)
        return generated_anndata(plan)

    def reconstruct(
        self,
        adata: anndata.AnnData | None = None,
        *,
        batch_size: int = PREDICT_CHUNK,
        layer: str | None = None,
        sample: bool = False,
        seed: int = 0,
        library_size: float | None = None,
    ) -> anndata.AnnData:
        """The cells decoded in their own contexts: :meth:`counterfactual` without targets (with
        ``sample``, counts drawn around the reconstruction: a model trained with
        ``model.likelihood = "nb"`` only)."""
        return self.counterfactual(
            adata, None, batch_size=batch_size, layer=layer, sample=sample, seed=seed,
            library_size=library_size,
        )  # fmt: skip

    def get_latent_representation(
        self,
        adata: anndata.AnnData | None = None,
        *,
        head: str = "base",
        batch_size: int = PREDICT_CHUNK,
        layer: str | None = None,
    ) -> np.ndarray:
        """Every cell's latent representation, one row per cell in ``adata``'s order.

        Args:
            adata: the cells (default: the set-up AnnData).
            head: ``"base"``: the base head's latent ``h = x Wᵀ``, which sees no context (the
                default); a field's name: that field head's latent in the cell's own context,
                ``C_f[source] E_f x``; ``"all"``: every head's latent side by side, base first,
                then the fields in the model's order.
            batch_size: cells encoded at once.
            layer: as for :meth:`counterfactual`.

        Returns:
            A (cells, latent_dim) float32 array ((cells, latent_dim x (1 + fields)) for
            ``"all"``).

        Raises:
            ConfigError: ``head`` is none of those.
            DataError, MetadataError: as for :meth:`counterfactual`.
        """
        trained = self._require_trained()
        fields = list(trained.vocabularies.fields)
        if head not in ("base", "all", *fields):
            raise ConfigError(f"head={head!r}: choose 'base', 'all' or a field: {fields}")
        store = self._store(adata, layer, batch_size)
        plan = plan_generation(trained, store, {})
        parts = []
        for chunk, source in zip(store.chunks, plan.sources, strict=True):
            out = trained.reconstruct(store.read_expression(chunk)[:, plan.columns], source)
            latents = {"base": out.base_hidden, **out.field_hidden}
            chosen = list(latents.values()) if head == "all" else [latents[head]]
            parts.append(np.concatenate([t.cpu().numpy() for t in chosen], axis=1))
        return np.concatenate(parts)

    def save(self, path: str | Path, overwrite: bool = False) -> Path:
        """Write the model's checkpoint to ``path/checkpoints/last.pt`` (atomically): a folder
        that :meth:`load`, ``cae generate --model`` and :func:`cae.train.load_checkpoint` take.

        Returns:
            The checkpoint file written.

        Raises:
            CheckpointError: nothing trained or loaded yet, or ``path`` holds a checkpoint and
                ``overwrite`` is False.
        """
        from cae.train.checkpoint import copy_checkpoint
        from cae.train.folder import CHECKPOINT

        trained = self._require_trained()
        assert trained.checkpoint is not None  # load_checkpoint notes it
        folder = check_output_path(Path(path), "path", folder=True)
        target = folder / CHECKPOINT
        if target.exists() and not overwrite:
            raise CheckpointError(f"{target} already exists; pass overwrite=True or another path")
        target.parent.mkdir(parents=True, exist_ok=True)
        copy_checkpoint(trained.checkpoint, target)
        return target

    @classmethod
    def load(cls, model: str | Path, adata: anndata.AnnData | None = None) -> CAE:
        """Load a trained model: a training folder, a checkpoint file, or an MLflow model URI
        (``models:/NAME@alias``, from the tracking URI in force).

        Args:
            model: where the model is.
            adata: the default cells of predictions (need not be set up).

        Raises:
            CheckpointError: nothing there, or not a CAE model.
        """
        loaded = cls()
        loaded.adata = adata
        loaded.trained = load_any_model(str(model))
        return loaded

    def _require_setup(self) -> dict[str, Any]:
        if self.setup is None:
            raise ConfigError(
                "no AnnData set up to train on: call CAE.setup_anndata(adata, fields=[...]) "
                "and then CAE(adata)"
            )
        return self.setup

    def _require_trained(self) -> TrainedModel:
        if self.trained is None:
            raise ConfigError("the model is not trained: call train() first, or CAE.load(...)")
        return self.trained

    def _store(self, adata: anndata.AnnData | None, layer: str | None, size: int) -> DataStore:
        """A store over ``adata`` (default: the set-up one) for the model's genes."""
        trained = self._require_trained()
        adata = self.adata if adata is None else adata
        if adata is None:
            raise ConfigError("give the cells: adata=...")
        if layer is None:
            layer = trained.settings.data.h5ad_layer
        return DataStore.from_anndata(adata, None if layer == "X" else layer, None, size)


def _read_setup(adata: anndata.AnnData) -> dict[str, Any]:
    setup = adata.uns.get(SETUP_KEY)
    if not isinstance(setup, Mapping) or "fields" not in setup:
        raise ConfigError(
            "this AnnData was not set up: call CAE.setup_anndata(adata, fields=[...]) first"
        )
    genes = setup.get("genes")
    return {
        "fields": [str(f) for f in setup["fields"]],
        "layer": setup.get("layer"),
        "genes": None if genes is None else [str(g) for g in genes],
        "library_key": setup.get("library_key"),
    }


@contextmanager
def _epoch_lines(shown: bool) -> Iterator[None]:
    """Show cae's INFO lines (one per epoch) on stderr while training, unless logging was set
    up by the application (its handlers decide) or progress is off."""
    logger = logging.getLogger("cae")
    if not shown or logger.hasHandlers():
        yield
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
