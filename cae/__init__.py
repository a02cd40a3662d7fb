"""CAE: context-conditioned cycle autoencoders for single-cell expression.

The public API, for people who want Python rather than the ``cae`` command::

    import cae

    cae.CAE.setup_anndata(adata, fields=["cell_type", "sex"], layer="counts")
    model = cae.CAE(adata)
    model.train(epochs=15)
    moved = model.counterfactual(targets={"sex": "female"})  # an AnnData (cae.api)

Over files: ``cae.load_settings`` and ``train``/``load_checkpoint`` from ``cae.train``.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("cae")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

# ``train`` itself lives in ``cae.train`` (the subpackage's name would shadow it here).
_API = {
    "CAE": "cae.api",
    "Settings": "cae.config",
    "load_settings": "cae.config",
    "load_model": "cae.tracking.pyfunc",
}

__all__ = ["__version__", *_API]


def __getattr__(name: str) -> object:
    """Import the API lazily, so that ``cae --version`` stays fast."""
    if name in _API:
        from importlib import import_module

        return getattr(import_module(_API[name]), name)
    raise AttributeError(f"module 'cae' has no attribute {name!r}")
