"""CAE: context-conditioned cycle autoencoders for single-cell expression.

The public API, for people who want Python rather than the ``cae`` command::

    from cae import Settings, train, load_checkpoint

    result = train(Settings(data={"path": "data/demo", "fields": ["cell_type", "sex"]}))
    trained = load_checkpoint(result.checkpoint)
    cf = trained.counterfactual(x, source={"sex": ["male"] * len(x)}, targets={"sex": "female"})
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("cae")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"
