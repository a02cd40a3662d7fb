"""Training on two processes (torchrun, gloo, DistributedDataParallel) learns like one process:
both validation curves fall, their ends agree, and only rank 0 writes files and the MLflow run."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from cae.data.synth import SynthConfig, generate
from cae.errors import ConfigError
from cae.train.distributed import Ranks, ranks_from_environment

EPOCHS = 5


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def train_command(data: Path, out: Path, batch_size: int, tracking: str) -> list[str]:
    return [
        "-m", "cae.cli", "-q", "train", "--data", str(data), "--out", str(out),
        "--epochs", str(EPOCHS), "--batch-size", str(batch_size), "--latent-dim", "8",
        "--num-workers", "0", "--no-progress", "--lr", "1e-2", "--tracking-uri", tracking,
        "--val-chunks", "3,7",
    ]  # fmt: skip


def val_curve(out: Path) -> list[float]:
    history = json.loads((out / "history.json").read_text())
    return [epoch["val/reconstruction"] for epoch in history]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate(
        tmp_path_factory.mktemp("ddp") / "data", SynthConfig(n_cells=1600, n_genes=30, n_chunks=8)
    )


def test_two_processes_learn_like_one(data: Path, tmp_path: Path) -> None:
    # Run where artifacts may land (MLflow's default artifact root is ./mlruns).
    # the last step's weights (no moving average): what the ranks' averaged gradients learn
    env = {**os.environ, "CAE_TRAIN__THREADS": "1", "CAE_TRAIN__SEED": "3", "CAE_TRAIN__EMA": "0"}
    env = {k: v for k, v in env.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    one = subprocess.run(
        [sys.executable, *train_command(data, tmp_path / "one", 64, tracking)],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert one.returncode == 0, one.stderr[-3000:]
    launcher = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
        "--master_addr=127.0.0.1", f"--master_port={free_port()}",
    ]  # fmt: skip
    # Two ranks of 32 cells make the same global batch as one process of 64.
    two = subprocess.run(
        [*launcher, *train_command(data, tmp_path / "two", 32, tracking)],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert two.returncode == 0, two.stderr[:3000]
    assert two.stdout.count("trained 5 epochs") == 1  # rank 0 alone reports

    curve_one, curve_two = val_curve(tmp_path / "one"), val_curve(tmp_path / "two")
    print("1 process:", curve_one, "\n2 processes:", curve_two)
    assert len(curve_one) == len(curve_two) == EPOCHS
    for curve in (curve_one, curve_two):
        assert curve[-1] < 0.8 * curve[0], curve  # both learn
    assert curve_two[-1] == pytest.approx(curve_one[-1], rel=0.15)

    import mlflow

    mlflow.set_tracking_uri(tracking)
    runs = mlflow.search_runs(experiment_names=["Default"], output_format="list")
    assert len(runs) == 2  # one per training, none from rank 1
    assert sorted(r.data.metrics["epoch"] for r in runs) == [EPOCHS, EPOCHS]


def test_ranks_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert ranks_from_environment() == Ranks(0, 1, 0)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    ranks = ranks_from_environment()
    assert ranks.enabled and not ranks.is_main and (ranks.rank, ranks.world_size) == (1, 2)
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(ConfigError, match="RANK=2"):
        ranks_from_environment()
