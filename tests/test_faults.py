"""Faults a training survives with nothing lost: `kill -9` mid-epoch then --resume, a checkpoint
write killed half-way, a loss that turns NaN, and a tracking server that dies mid-run. Real
processes, real signals, a real `mlflow server` on 127.0.0.1."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

import pytest
import torch

from cae.cli import main
from cae.data.synth import SynthConfig, generate
from cae.tracking.callbacks import tracked
from cae.train import Callback, train
from cae.train.checkpoint import load_checkpoint, read_checkpoint
from cae.train.trainer import TrainingError
from tests.conftest import quick_settings
from tests.servers import free_port, mlflow_server_command, running
from tests.test_tracking import assert_training_recorded, only_run

SMALL = ["--latent-dim", "8", "--batch-size", "64", "--num-workers", "0", "--no-progress"]


pytestmark = pytest.mark.usefixtures("isolated")  # a temporary folder, no CAE_/MLFLOW_ settings


def _wait_for(condition: Callable[[], bool], process: subprocess.Popen, what: str) -> None:
    """Poll until ``condition`` holds; fail if ``process`` exits first or 120 s pass."""
    deadline = time.monotonic() + 120
    while not condition():
        if process.poll() is not None or time.monotonic() > deadline:
            output = process.stderr.read() if process.stderr else ""
            pytest.fail(f"gave up waiting for {what}: {output[-2000:]}")
        time.sleep(0.02)


@pytest.fixture(scope="module")
def chunks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """2,000 cells x 50 genes in 4 chunks: a few epochs take seconds, not one blink."""
    return generate(
        tmp_path_factory.mktemp("faults") / "data",
        SynthConfig(n_cells=2000, n_genes=50, n_chunks=4),
    )


def test_kill_9_mid_epoch_then_resume_equals_an_uninterrupted_run(chunks: Path, tmp_path: Path):
    args = ["train", "--data", str(chunks), "--epochs", "4", "--no-tracking", *SMALL]
    assert main([*args, "--out", str(tmp_path / "straight")]) == 0

    out = tmp_path / "killed"
    checkpoint = out / "checkpoints" / "last.pt"
    command = [sys.executable, "-m", "cae.cli", *args, "--out", str(out)]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    _wait_for(checkpoint.exists, process, "the first epoch's checkpoint")
    assert process.poll() is None, "still training: epoch 2 is under way"
    os.kill(process.pid, signal.SIGKILL)
    process.wait(timeout=30)
    process.stderr.close()
    assert process.returncode == -signal.SIGKILL
    survived = read_checkpoint(out)
    assert 1 <= survived["epoch"] < 4 and survived["partial"] is None

    assert main([*args, "--out", str(out), "--resume"]) == 0
    resumed, straight = read_checkpoint(out), read_checkpoint(tmp_path / "straight")
    assert resumed["epoch"] == straight["epoch"] == 4
    for name, tensor in straight["model"].items():
        torch.testing.assert_close(resumed["model"][name], tensor, rtol=1e-5, atol=1e-6)
    for a, b in zip(resumed["history"], straight["history"], strict=True):
        for key in ("train/loss", "val/loss", "contrib_l2/sex"):
            assert a[key] == pytest.approx(b[key], rel=1e-5)


_WRITER = """
import sys
from pathlib import Path

import torch

from cae.train.checkpoint import save_checkpoint

weights = torch.zeros(10_000_000)  # 40 MB: each write takes a while
for version in range(1_000_000):
    save_checkpoint(Path(sys.argv[1]), {"format": 2, "version": version, "weights": weights})
    weights += 1
"""


def test_a_checkpoint_write_killed_half_way_leaves_the_previous_checkpoint(tmp_path: Path):
    path = tmp_path / "checkpoints" / "last.pt"
    process = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(path)], stderr=subprocess.PIPE, text=True
    )

    def writing() -> bool:  # a complete checkpoint exists and the next one is half written
        partial = list(path.parent.glob(".last.pt.tmp-*"))
        return path.exists() and any(p.stat().st_size > 0 for p in partial)

    try:
        _wait_for(writing, process, "a checkpoint write in progress")
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
            process.wait(timeout=30)
        process.stderr.close()
    assert list(path.parent.glob(".last.pt.tmp-*")), "the kill interrupted a write"
    payload = read_checkpoint(path)
    assert torch.all(payload["weights"] == payload["version"]), "one whole version, not a mix"


def test_a_nan_loss_stops_training_and_keeps_the_last_good_checkpoint(small_data, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--data", str(small_data), "--out", str(out), "--no-tracking", *SMALL]
    assert main([*args, "--epochs", "1"]) == 0
    checkpoint = out / "checkpoints" / "last.pt"
    before, history = checkpoint.read_bytes(), (out / "history.json").read_text()
    capsys.readouterr()

    absurd = [*args, "--epochs", "3", "--resume", "--lr", "1e30"]  # the weights overflow
    assert main(absurd) == 2
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    (line,) = captured.err.strip().splitlines()
    where = ["became nan in epoch 2, in the window of chunks", "synth_counts_", str(checkpoint)]
    remedy = ["lower train.lr (--lr, now 1e+30)", "--resume", "check those chunks' values"]
    for part in [*where, *remedy]:
        assert part in line, (part, line)
    with pytest.raises(TrainingError):
        main(["--debug", *absurd])
    assert checkpoint.read_bytes() == before
    assert (out / "history.json").read_text() == history
    trained = load_checkpoint(out)
    assert trained.epoch == 1
    assert all(torch.isfinite(p).all() for p in trained.model.parameters())

    assert main([*args, "--epochs", "2", "--resume"]) == 0, "the kept checkpoint resumes"
    assert read_checkpoint(out)["epoch"] == 2


def test_a_diverged_training_stops_and_keeps_the_last_good_checkpoint(tiny, tmp_path, capsys):
    """A loss that runs away but stays finite (ten times the lowest epoch's and more) stops the
    training as the non-finite one does: one line, exit 2, nothing of the diverged epoch kept."""
    out = tmp_path / "run"
    args = ["train", "--data", str(tiny), "--out", str(out), "--no-tracking", *SMALL]
    assert main([*args, "--epochs", "1"]) == 0
    checkpoint = out / "checkpoints" / "last.pt"
    before, history = checkpoint.read_bytes(), (out / "history.json").read_text()
    lowest = json.loads(history)[0]["train/loss"]
    capsys.readouterr()

    assert main([*args, "--epochs", "3", "--resume", "--lr", "1"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    parts = [f"the training loss rose from {lowest:.4g} (epoch 1) to", "in epoch 2", "diverged",
             str(checkpoint), "lower train.lr (--lr, now 1)", "--resume",
             "train.lr_schedule = cosine"]  # fmt: skip
    for part in parts:
        assert part in line, (part, line)
    assert checkpoint.read_bytes() == before
    assert (out / "history.json").read_text() == history
    assert main([*args, "--epochs", "2", "--resume"]) == 0, "the kept checkpoint resumes"


class _AtEpochEnd(Callback):
    """Runs ``actions[epoch]`` after that epoch (after the MLflow callback sent its metrics)."""

    def __init__(self, actions: dict[int, Callable[[], object]]) -> None:
        self.actions = actions

    def on_epoch_end(self, trainer, epoch, metrics):
        if epoch in self.actions:
            self.actions[epoch]()


def test_training_outlives_its_tracking_server_and_nothing_is_lost(
    small_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog
):
    # MLflow's own retries would make each failed request take minutes; one attempt will do here.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    command, env, health = mlflow_server_command(
        f"sqlite:///{tmp_path / 'server.db'}", tmp_path, free_port()
    )
    url = health.removesuffix("/health")
    out = tmp_path / "run"
    settings = quick_settings(
        small_data, out, **{"train.epochs": 3, "tracking.uri": url, "tracking.retry_seconds": 0}
    )
    with ExitStack() as servers:
        server = servers.enter_context(running(command, env, health, tmp_path / "server-1.log"))

        def kill() -> None:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=30)

        def restart() -> None:
            nonlocal server
            server = servers.enter_context(running(command, env, health, tmp_path / "s-2.log"))

        # epoch 1 is recorded; the server dies; epoch 2 fails; it is back for epoch 3, which
        # sends epochs 2 and 3; it dies again before the artifacts at the end.
        hooks = _AtEpochEnd({1: kill, 2: restart, 3: kill})
        with caplog.at_level(logging.WARNING), tracked(settings) as callbacks:
            result = train(settings, [*callbacks, hooks])

    assert result.epochs == 3 and read_checkpoint(result.checkpoint)["epoch"] == 3
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(url in w and "training goes on" in w for w in warnings), warnings
    assert any("answers again" in w for w in warnings), warnings
    assert any(f"cae runs sync --out {out}" in w for w in warnings), warnings
    (pending,) = (out / "tracking").glob("pending-*.json")
    kinds = [record["kind"] for record in json.loads(pending.read_text())["records"]]
    assert "metrics" not in kinds, "epochs 2 and 3 reached the server when it came back"
    assert kinds.count("artifact") >= 7 and kinds[-1] == "end"
    assert (out / "plots" / "contribution_shares.png").is_file(), "plots are kept locally too"

    with running(command, env, health, tmp_path / "server-3.log"):
        assert main(["runs", "sync", "--out", str(out)]) == 0
        assert not pending.exists()
        client, run = only_run(url, "Default")
        assert_training_recorded(client, run, epochs=3, fields=["cell_type", "assay", "sex"])
