"""Loading, cells/s: the mixing loader versus the raw rate of reading and densifying the same
chunks in a tight loop (this machine's limit), versus the seed's row-by-row loader; the loader
feeding the real train step; peak memory when training on 4 versus 16 chunks; and the same loader
on a TileDB-SOMA experiment of the same cells versus tiledbsoma's raw read of the same rows.

    python bench/loader.py [--quick] [--threads 2]

Census-like chunks are written to a temporary folder: 8,192 cells x 2,000 genes each, about 10%
non-zero (CSR, ``scipy.sparse.save_npz``), metadata with cell_type (790 values), assay (26) and sex
(3) as parquet. Cases, timed in turn round after round:

* raw: each chunk read, checked and encoded as a loader worker does, then densified batch by batch
  (1,024 shuffled cells), all in the measuring process: what one process can do at most;
* loader: the trainer's loader at the default shuffle window (``data.shuffle_chunks`` chunks
  pooled, every batch drawn across them; one persistent worker prefetching 2 chunks, the
  default; and two workers), batches densified in the training process, with a trivial
  consumer; and the same with windows of one chunk (no mixing), to show what mixing costs;
* seed loader: the seed's design (chunk workers started anew each epoch; per chunk an inner loader
  whose items densify one row each, its worker started anew), on the first two chunks; and the
  same with the rows densified in the measuring process (no inner worker), kinder to it;
* train step fed by the loader versus the same steps on batches already in memory (genes 2,000,
  latent 128, fields as above);
* peak RSS of ``cae train`` (1 epoch) on 4 and on 16 chunks, each in its own process, at the
  default shuffle window;
* SOMA: the first 4 chunks' cells written as a TileDB-SOMA experiment (``tiledbsoma.io``); the
  loader over it (SOMA chunks of the same size, default window, one worker) versus tiledbsoma
  reading the same rows in the same row ranges into Arrow tables, in this process.

Prints one line per case and writes bench/results/loader.json.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from measure import arguments, interleaved, setup, write_result
from seed_reference import seed_batches

from cae.config import DataConfig, LossWeights, load_settings
from cae.data.loader import (
    ChunkDataset,
    EpochOrder,
    chunk_loader,
    epoch_seed,
    iter_batches,
    windows_of,
)
from cae.data.store import DataStore
from cae.data.vocabulary import DEFAULT_NULL_VALUES, Vocabularies, build_field_specs
from cae.model.cae import CAE
from cae.model.classifier import ContextClassifier
from cae.train.cycle import sample_targets, training_step
from cae.train.optim import build_optimizers

FIELDS = {"cell_type": 790, "assay": 26, "sex": 3}
QUICK_FIELDS = {"cell_type": 20, "assay": 5, "sex": 3}


def write_chunks(
    folder: Path, n_chunks: int, cells: int, genes: int, fields: dict[str, int]
) -> Path:
    """Census-like chunks: log-normalised values, ~10% non-zero, string metadata as parquet."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for chunk in range(n_chunks):
        matrix = sp.random(
            cells, genes, density=0.1, format="csr", dtype=np.float32, random_state=rng
        )
        matrix.data = np.log1p(matrix.data * 20).astype(np.float32)
        sp.save_npz(folder / f"census_counts_{chunk}.npz", matrix)
        meta = pd.DataFrame(
            {f: rng.choice([f"{f}_{i}" for i in range(k)], cells) for f, k in fields.items()}
        )
        meta.to_parquet(folder / f"census_metadata_{chunk}.parquet")
    return folder


WINDOW = DataConfig().shuffle_chunks  # the default shuffle window


def open_dataset(path: Path | str, chunk_size: int = 20_000) -> ChunkDataset:
    config = DataConfig(path=str(path), metadata_glob="*_metadata_*", h5ad_chunk_size=chunk_size)
    store = DataStore.open(config)
    specs = build_field_specs(store.iter_metadata(list(FIELDS)), list(FIELDS))
    vocabularies = Vocabularies.from_specs(specs)
    return ChunkDataset(
        store, vocabularies, DEFAULT_NULL_VALUES, val_chunks=[], val_fraction=0.0, seed=0
    )


def main() -> None:
    parser = arguments(__doc__.split("\n\n")[0])
    parser.add_argument("--train-rss", help=argparse.SUPPRESS)  # the child of the RSS case
    args = parser.parse_args()
    if args.train_rss:
        train_rss(Path(args.train_rss), args.threads, args.quick)
        return
    setup(args.threads)
    quick = args.quick
    n_chunks, cells, genes = (4, 512, 100) if quick else (16, 8192, 2000)
    batch, rounds = (128, 2) if quick else (1024, 3)
    cpu = torch.device("cpu")
    with tempfile.TemporaryDirectory() as tmp:
        fields = QUICK_FIELDS if quick else FIELDS
        folder = write_chunks(Path(tmp) / "chunks", n_chunks, cells, genes, fields)
        dataset = open_dataset(folder)
        total = n_chunks * cells
        rows = np.arange(cells, dtype=np.int64)

        def raw() -> None:
            generator = torch.Generator().manual_seed(0)
            for index in range(n_chunks):
                chunk = dataset[index]
                for b in iter_batches([chunk], [rows], batch, cpu, "none", generator):
                    b.x.shape  # noqa: B018 (a trivial consumer)

        seed_chunks = min(2, n_chunks)

        def seed_loader(inner_workers: int) -> object:
            def run() -> None:
                outer = torch.utils.data.DataLoader(  # workers started anew for every epoch
                    dataset, batch_size=None, sampler=range(seed_chunks), collate_fn=lambda c: c,
                    num_workers=1, persistent_workers=False,
                )  # fmt: skip
                generator = torch.Generator().manual_seed(0)
                for chunk in outer:
                    rows = seed_batches(
                        chunk.expression, chunk.contexts, batch, generator, inner_workers
                    )
                    for x, _ in rows:
                        x.shape  # noqa: B018

            return run

        cases = {
            "raw": raw,
            "loader": mixing_loader(dataset, n_chunks, batch, workers=1),  # the trainer's default
            "loader_2": mixing_loader(dataset, n_chunks, batch, workers=2),
            "unmixed": mixing_loader(dataset, n_chunks, batch, workers=1, window=1),
            "seed": seed_loader(1),  # the seed's design: inner workers started for each chunk
            "seed_inline": seed_loader(0),  # kinder to it: rows densified in this process
        }
        times = interleaved(cases, rounds, warmup=1)
        rates = {
            "raw_cells_per_s": total / times["raw"],
            "loader_cells_per_s": total / times["loader"],
            "loader_2_workers_cells_per_s": total / times["loader_2"],
            "unmixed_loader_cells_per_s": total / times["unmixed"],
            "seed_cells_per_s": seed_chunks * cells / times["seed"],
            "seed_inline_cells_per_s": seed_chunks * cells / times["seed_inline"],
        }
        over_raw = rates["loader_cells_per_s"] / rates["raw_cells_per_s"]
        over_seed = rates["loader_cells_per_s"] / rates["seed_cells_per_s"]
        over_inline = rates["loader_cells_per_s"] / rates["seed_inline_cells_per_s"]
        print(
            f"loader, windows of {WINDOW} chunks, trivial consumer: "
            f"{rates['loader_cells_per_s']:9.0f} cells/s  raw "
            f"read+densify {rates['raw_cells_per_s']:9.0f} cells/s ({over_raw:5.1%})  seed "
            f"row-by-row {rates['seed_cells_per_s']:8.0f} cells/s (ours {over_seed:5.1f}x; "
            f"{over_inline:4.1f}x with its rows densified inline)",
            flush=True,
        )
        two = rates["loader_2_workers_cells_per_s"]
        raw_share, seed_ratio = two / rates["raw_cells_per_s"], two / rates["seed_cells_per_s"]
        print(
            f"loader, 2 workers:        {two:9.0f} cells/s  ({raw_share:5.1%} of raw, "
            f"{seed_ratio:4.1f}x the seed's loader)",
            flush=True,
        )
        unmixed = rates["unmixed_loader_cells_per_s"]
        print(
            f"loader, windows of 1 chunk (no mixing): {unmixed:9.0f} cells/s (mixing costs "
            f"{1 - rates['loader_cells_per_s'] / unmixed:+.1%})",
            flush=True,
        )
        step = step_through_loader(dataset, n_chunks, batch, genes, quick, rounds)
        rss = {}
        for count in (4, 16) if not quick else (2, 4):
            subset = Path(tmp) / f"first_{count}"
            subset.mkdir()
            for chunk in range(count):
                for name in (f"census_counts_{chunk}.npz", f"census_metadata_{chunk}.parquet"):
                    (subset / name).symlink_to(folder / name)
            rss[count] = measure_rss(subset, args.threads, quick)
        small, large = sorted(rss)
        ratio = rss[large]["peak_rss_mb"] / rss[small]["peak_rss_mb"]
        print(
            f"peak RSS, cae train 1 epoch, windows of {WINDOW}: {small} chunks "
            f"{rss[small]['peak_rss_mb']:7.0f} MB, {large} chunks "
            f"{rss[large]['peak_rss_mb']:7.0f} MB ({ratio - 1:+.1%}); loader worker "
            f"{rss[small]['worker_peak_rss_mb']:.0f} / {rss[large]['worker_peak_rss_mb']:.0f} MB",
            flush=True,
        )
        soma = soma_case(folder, Path(tmp) / "soma", min(4, n_chunks), cells, batch, rounds)
    result = {
        "threads": args.threads,
        "shuffle_chunks": WINDOW,
        "chunks": n_chunks,
        "cells_per_chunk": cells,
        "genes": genes,
        "batch": batch,
        **rates,
        "loader_over_raw": over_raw,
        "loader_over_seed": over_seed,
        "loader_over_seed_inline": over_inline,
        "train_step": step,
        "peak_rss": {str(k): v for k, v in rss.items()},
        "peak_rss_ratio": ratio,
        "soma": soma,
    }
    write_result(args.out, "loader", result)


def mixing_loader(
    dataset: ChunkDataset,
    n_chunks: int,
    batch: int,
    workers: int,
    window: int = WINDOW,
    consume: Callable[[torch.Tensor, torch.Tensor], None] | None = None,
) -> Callable[[], None]:
    """One epoch per call of the trainer's loader: chunks permuted, pooled into shuffle windows,
    every batch drawn across a window (what ``Trainer._train_epoch`` does)."""
    cpu = torch.device("cpu")
    order = EpochOrder(range(n_chunks), seed=0, window=window)
    loader = chunk_loader(dataset, order, num_workers=workers, prefetch_factor=2, window=window)
    epoch = [0]

    def run() -> None:
        epoch[0] += 1
        order.set_epoch(epoch[0])
        generator = torch.Generator().manual_seed(epoch_seed(0, epoch[0], "rows"))
        for pooled in windows_of(loader, [len(w) for w in order.remaining()]):
            rows = [chunk.train_rows for chunk in pooled]
            for b in iter_batches(pooled, rows, batch, cpu, "none", generator):
                if consume is None:
                    b.x.shape  # noqa: B018 (a trivial consumer)
                else:
                    consume(b.x, b.contexts)

    return run


def soma_case(
    folder: Path, uri: Path, n_chunks: int, cells: int, batch: int, rounds: int
) -> dict[str, float]:
    """The loader over a SOMA experiment of the first ``n_chunks`` chunks versus tiledbsoma's raw
    read of the same rows (same row ranges, Arrow tables out, nothing densified)."""
    import anndata
    import tiledbsoma
    import tiledbsoma.io

    chunk_data = open_dataset(folder)
    store = chunk_data.store
    x = sp.vstack([store.read_expression(c) for c in store.chunks[:n_chunks]], format="csr")
    obs = pd.concat(
        [store.read_metadata(c) for c in store.chunks[:n_chunks]], ignore_index=True
    ).astype("category")
    obs.index = obs.index.astype(str)
    adata = anndata.AnnData(x, obs=obs, var=pd.DataFrame(index=store.genes))
    started = time.perf_counter()
    tiledbsoma.io.from_anndata(str(uri), adata, measurement_name="RNA", X_layer_name="raw")
    written = time.perf_counter() - started
    dataset = open_dataset(uri, chunk_size=cells)
    total = n_chunks * cells

    def raw_read() -> None:
        with tiledbsoma.Experiment.open(str(uri)) as experiment:
            layer = experiment.ms["RNA"].X["raw"]
            for start in range(0, total, cells):
                layer.read(coords=(slice(start, start + cells - 1),)).tables().concat()

    cases = {"soma_raw": raw_read, "soma_loader": mixing_loader(dataset, n_chunks, batch, 1)}
    times = interleaved(cases, rounds, warmup=1)
    result = {
        "chunks": n_chunks,
        "write_seconds": written,
        "raw_read_cells_per_s": total / times["soma_raw"],
        "loader_cells_per_s": total / times["soma_loader"],
    }
    result["loader_over_raw_read"] = result["loader_cells_per_s"] / result["raw_read_cells_per_s"]
    print(
        f"SOMA ({n_chunks} chunks' cells): loader {result['loader_cells_per_s']:9.0f} cells/s  "
        f"tiledbsoma raw read {result['raw_read_cells_per_s']:9.0f} cells/s "
        f"({result['loader_over_raw_read']:5.1%})",
        flush=True,
    )
    return result


def step_through_loader(
    dataset: ChunkDataset, n_chunks: int, batch: int, genes: int, quick: bool, rounds: int
) -> dict[str, float]:
    """The real train step fed by the two-level loader versus on batches already in memory."""
    cpu = torch.device("cpu")
    used = 1 if quick else min(2, n_chunks)
    sizes = dataset.vocabularies.sizes()
    latent = 16 if quick else 128
    torch.manual_seed(0)
    model = CAE(genes, latent, sizes, logit_scale=0.0159)
    model.configure_context_maps("auto", sparse_grad=True)
    classifier = ContextClassifier(genes, 128, sizes)
    optimizer, classifier_optimizer = build_optimizers(model, classifier, 1e-3, 1e-3)
    counts = torch.tensor(list(sizes.values()))
    weights = LossWeights()
    targets = torch.Generator().manual_seed(0)

    def step(x: torch.Tensor, source: torch.Tensor) -> None:
        target = sample_targets(source, counts, targets)
        training_step(
            model, classifier, optimizer, classifier_optimizer, x, source, target, weights
        )

    chunks = [dataset[index] for index in range(used)]
    in_memory = [
        (b.x, b.contexts)
        for b in iter_batches(chunks, [c.train_rows for c in chunks], batch, cpu, "none")
    ]
    fed_by_loader = mixing_loader(dataset, used, batch, workers=1, consume=step)

    def from_memory() -> None:
        for x, source in in_memory:
            step(x, source)

    times = interleaved({"loader": fed_by_loader, "memory": from_memory}, rounds, warmup=1)
    cells = sum(len(x) for x, _ in in_memory)
    result = {
        "chunks": used,
        "latent": latent,
        "loader_cells_per_s": cells / times["loader"],
        "in_memory_cells_per_s": cells / times["memory"],
        "loader_over_in_memory": times["memory"] / times["loader"],
    }
    print(
        f"train step fed by the loader: {result['loader_cells_per_s']:7.0f} cells/s  on batches in "
        f"memory {result['in_memory_cells_per_s']:7.0f} cells/s "
        f"({result['loader_over_in_memory']:5.1%})",
        flush=True,
    )
    return result


def measure_rss(folder: Path, threads: int, quick: bool) -> dict[str, float]:
    """Peak RSS of one ``cae train`` epoch on ``folder``, run in a fresh process."""
    command = [sys.executable, __file__, "--train-rss", str(folder), "--threads", str(threads)]
    done = subprocess.run(
        [*command, *(["--quick"] if quick else [])],
        capture_output=True,
        text=True,
        check=True,
        cwd=folder.parent,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def train_rss(folder: Path, threads: int, quick: bool) -> None:
    """(In a child process) train one epoch on ``folder`` and print the peak RSS as JSON."""
    from cae.train.trainer import train

    settings = load_settings(
        None,
        {
            "data.path": str(folder),
            "data.fields": list(FIELDS),
            "data.num_workers": 1,
            "data.transform": "none",
            "data.validate_values": "headers",
            "model.latent_dim": 16 if quick else 32,
            "train.batch_size": 128 if quick else 1024,
            "train.epochs": 1,
            "train.threads": threads,
            "train.progress": False,
            "output.dir": str(folder.parent / f"run_{folder.name}"),
        },
    )
    started = time.perf_counter()
    train(settings)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB on Linux
    workers = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    seconds = time.perf_counter() - started
    print(json.dumps({"peak_rss_mb": peak, "worker_peak_rss_mb": workers, "seconds": seconds}))


if __name__ == "__main__":
    main()
