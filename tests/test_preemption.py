"""SIGTERM/SIGUSR1 (SLURM's warning before a time limit or preemption): training writes a
mid-epoch checkpoint at the next chunk boundary, exits with status 75, and resumes exactly."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cae.train import Callback, train
from cae.train.checkpoint import read_checkpoint
from cae.train.trainer import EXIT_PREEMPTED, Preempted
from tests.conftest import quick_settings


class _SignalAfterWindow(Callback):
    """Sends a real signal to this process after a given shuffle window of a given epoch."""

    def __init__(self, epoch: int, window: int, number: int) -> None:
        self.epoch, self.window, self.number = epoch, window, number

    def on_window_end(self, trainer, epoch, windows_done):
        if (epoch, windows_done) == (self.epoch, self.window):
            os.kill(os.getpid(), self.number)


@pytest.mark.parametrize("number", [signal.SIGUSR1, signal.SIGTERM])
def test_signal_mid_epoch_then_resume_equals_an_uninterrupted_run(small_data, tmp_path, number):
    # 3 chunks in windows of at most 2: two windows an epoch, [2, 1] chunks.
    windowed = {"train.epochs": 3, "data.shuffle_chunks": 2}
    straight = train(quick_settings(small_data, tmp_path / "a", **windowed))
    settings = quick_settings(small_data, tmp_path / "b", **windowed)
    with pytest.raises(Preempted, match=signal.Signals(number).name):
        train(settings, [_SignalAfterWindow(epoch=2, window=1, number=number)])
    partial = read_checkpoint(tmp_path / "b")
    assert partial["epoch"] == 1 and partial["partial"]["windows_done"] == 1
    again = {**windowed, "output.resume": True}
    resumed = train(quick_settings(small_data, tmp_path / "b", **again))
    assert [e["epoch"] for e in resumed.history] == [1, 2, 3]
    final = read_checkpoint(resumed.checkpoint)
    assert final["partial"] is None
    for name, tensor in read_checkpoint(straight.checkpoint)["model"].items():
        torch.testing.assert_close(final["model"][name], tensor, rtol=1e-5, atol=1e-6)
    for key in ("train/loss", "val/loss", "contrib_l2/sex"):
        assert resumed.history[1][key] == pytest.approx(straight.history[1][key], rel=1e-5)


def test_handlers_are_restored_after_training(small_data, tmp_path):
    before = signal.getsignal(signal.SIGUSR1)
    train(quick_settings(small_data, tmp_path / "run", **{"train.epochs": 1}))
    assert signal.getsignal(signal.SIGUSR1) == before


def test_cae_train_exits_75_on_sigusr1_and_resumes(demo_data: Path, tmp_path: Path):
    out = tmp_path / "run"
    command = [
        sys.executable, "-m", "cae.cli", "train", "--data", str(demo_data), "--out", str(out),
        "--epochs", "4", "--num-workers", "0", "--no-tracking", "--no-progress",
    ]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (out / "checkpoints" / "last.pt").exists():  # epoch 1 done: epoch 2 under way
        assert process.poll() is None and time.monotonic() < deadline, process.stderr.read()
        time.sleep(0.1)
    process.send_signal(signal.SIGUSR1)
    _, stderr = process.communicate(timeout=120)
    if process.returncode == 0:
        pytest.skip("training finished before the signal arrived (machine too fast)")
    assert process.returncode == EXIT_PREEMPTED, stderr
    assert "stopped by SIGUSR1" in stderr and "--resume" in stderr
    assert "Traceback" not in stderr
    assert read_checkpoint(out)["partial"] is not None
    done = subprocess.run([*command, "--resume"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert read_checkpoint(out)["epoch"] == 4
