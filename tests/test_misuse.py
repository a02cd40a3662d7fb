"""Misuse a careful user could still make, through the real ``cae`` command: settings that pass
their ranges but cannot work, output paths that are files or lie under files, names the MLflow
registry refuses, two trainings in one folder, ``--overwrite`` that fails, ``kill -9`` leftovers,
and file modes. Each is refused before any work (exit 2, one line, nothing written) or handled."""

from __future__ import annotations

import fcntl
import importlib
import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from cae.data.atomic import clean_leftovers
from cae.train.checkpoint import read_checkpoint
from cae.train.folder import LOCK_NAME
from tests.fuzzing import files_under, run_cae

SMALL = ["--latent-dim", "8", "--batch-size", "64", "--num-workers", "0", "--no-progress"]

pytestmark = pytest.mark.usefixtures("isolated")  # a temporary folder, no CAE_/MLFLOW_ settings


def train_args(data: Path, out: Path, *more: str) -> list[str]:
    return ["train", "--data", str(data), "--out", str(out), "--epochs", "1", *SMALL, *more]


def refused(argv: list[str], *parts: str) -> str:
    """Run ``cae ARGV``; assert exit 2 with one line holding every part; return the line."""
    status, err = run_cae(argv)
    assert status == 2, err
    for part in parts:
        assert part in err, (part, err)
    return err


@pytest.mark.parametrize(
    ("flags", "parts"),
    [
        (["--device", "foo"], ["train.device = 'foo'", "use auto, cpu, cuda"]),
        (["--device", "cpux"], ["train.device = 'cpux'"]),
        (["--seed", "-1"], ["train.seed = -1", "greater than or equal to 0"]),
        (["--seed", str(2**40)], ["train.seed", "less than or equal to"]),
        (["--lr", "inf"], ["train.lr = inf", "finite"]),
        (["--lr", "nan"], ["train.lr = nan", "finite"]),
        (["--logit-scale", "1e400"], ["model.logit_scale", "finite"]),
        (["--val-fraction", "nan"], ["data.val_fraction", "finite"]),
        (["--fields", "cell_type,a=b"], ["field 'a=b'", "not =;", "rename the column"]),
        (["--fields", "cell/type"], ["field 'cell/type'", "not /;"]),
        (["--fields", ".."], ["field '..'"]),
        (["--register", "a/b"], ["registered model name 'a/b' is refused", "'/'"]),
        (["--register", "m", "--alias", "latest"], ["alias 'latest' is refused", "reserved"]),
        (["--register", "m", "--alias", "v3"], ["alias 'v3' is refused", "reserved"]),
        (["--register", "m", "--no-tracking"], ["--register needs tracking"]),
    ],
)
def test_settings_that_cannot_work_are_refused_before_anything_is_written(
    small_data: Path, tmp_path: Path, flags: list[str], parts: list[str]
):
    refused(train_args(small_data, tmp_path / "run", *flags), *parts)
    assert not (tmp_path / "run").exists()
    assert not (tmp_path / "mlflow.db").exists(), "no MLflow run was started"


def test_a_cuda_device_this_machine_lacks_is_refused_before_training(small_data, tmp_path):
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    refused(train_args(small_data, tmp_path / "run", "--device", f"cuda:{count}"), "cuda")
    assert not (tmp_path / "run").exists()


def test_output_paths_that_are_files_or_under_files_are_refused(small_data: Path, tmp_path: Path):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine\n")
    refused(train_args(small_data, a_file, "--no-tracking"), str(a_file), "is a file")
    refused(train_args(small_data, a_file / "run", "--no-tracking"), "notes.txt is a file")
    refused(["synth", "--out", str(a_file / "data")], "notes.txt is a file")
    refused(["preprocess", "--data", str(small_data), "--out", str(a_file)], "is a file")
    refused(
        ["convert", "--data", str(small_data), "--out", str(a_file / "x")], "notes.txt is a file"
    )
    refused(
        ["tune", "create", "--data", str(small_data), "--storage", str(a_file / "journal.log")],
        "notes.txt is a file",
    )
    assert a_file.read_text() == "mine\n"


def test_generate_refuses_an_out_under_a_file_before_moving_any_cell(
    demo_run, demo_data: Path, tmp_path: Path
):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine\n")
    argv = ["generate", "--model", str(demo_run.out_dir), "--input", str(demo_data),
            "--set", "sex=female", "--out", str(a_file / "moved.h5ad")]  # fmt: skip
    refused(argv, "notes.txt is a file")


def test_a_folder_in_use_by_another_training_is_refused(small_data: Path, tmp_path: Path):
    out = tmp_path / "run"
    out.mkdir()
    with open(out / LOCK_NAME, "w") as held:  # what a running training holds
        fcntl.flock(held, fcntl.LOCK_EX)
        refused(train_args(small_data, out, "--no-tracking"), "in use by another training")
    assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME], "nothing else was written"
    assert run_cae(train_args(small_data, out, "--no-tracking"))[0] == 0, "free again"


def test_overwrite_that_fails_gives_the_old_training_back(small_data: Path, tmp_path: Path):
    out = tmp_path / "run"
    assert run_cae(train_args(small_data, out, "--no-tracking"))[0] == 0
    before = files_under(out)
    # weights that overflow: the new training fails in its first epoch, before any checkpoint
    refused(train_args(small_data, out, "--no-tracking", "--overwrite", "--lr", "1e30"), "nan")
    assert files_under(out) == before, "the old training, whole"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_overwrite_replaces_the_whole_folder_once_the_new_training_has_a_checkpoint(
    small_data: Path, tmp_path: Path
):
    out = tmp_path / "run"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"  # tracked: tensorboard/ and plots/ too
    assert run_cae(train_args(small_data, out, "--tracking-uri", uri))[0] == 0
    (out / "mine.txt").write_text("a file of the old training's folder\n")
    assert (
        run_cae(train_args(small_data, out, "--no-tracking", "--overwrite", "--seed", "3"))[0] == 0
    )
    assert read_checkpoint(out)["settings"]["train"]["seed"] == 3
    assert not (out / "mine.txt").exists() and not (out / "tensorboard").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


@pytest.mark.parametrize(
    ("lr", "batch", "part"),
    [
        ("1e30", "64", "the training loss became nan"),
        # one step: its loss was finite, the weights it left are not
        ("1e300", "512", "evaluation after epoch 1 is not finite"),
    ],
)
def test_a_failed_training_into_a_new_folder_leaves_no_folder(
    tiny: Path, tmp_path: Path, lr: str, batch: str, part: str
):
    out = tmp_path / "deep" / "run"
    flags = ["--no-tracking", "--lr", lr, "--batch-size", batch]
    refused(train_args(tiny, out, *flags), part, "lower train.lr")
    assert not out.exists()


_KILLED_WRITER = """
import os, sys
from pathlib import Path
from cae.data.atomic import atomic_write, move_aside, staging_folder
kind, path = sys.argv[1], Path(sys.argv[2])
if kind == "file":
    with atomic_write(path) as file:
        file.write(b"half")
        os._exit(9)
elif kind == "folder":
    staging_folder(path)
    os._exit(9)
else:  # a training folder moved aside by --overwrite, the new one without a checkpoint yet
    move_aside(path)
    (path / "checkpoints").mkdir(parents=True)
    os._exit(9)
"""


def _killed_while_writing(kind: str, path: Path) -> None:
    done = subprocess.run([sys.executable, "-c", _KILLED_WRITER, kind, str(path)], timeout=120)
    assert done.returncode == 9


def test_leftovers_of_killed_writers_are_cleaned_by_the_next_one(small_data: Path, tmp_path: Path):
    history = tmp_path / "history.json"
    _killed_while_writing("file", history)
    _killed_while_writing("folder", tmp_path / "data")
    assert len(list(tmp_path.glob(".history.json.tmp-*"))) == 1
    assert len(list(tmp_path.glob(".data.tmp-*"))) == 1
    assert len(clean_leftovers(history)) == 1 and not list(tmp_path.glob(".history.json.*"))
    assert run_cae(["synth", "--out", str(tmp_path / "data"), "--cells", "60"])[0] == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]


def test_a_training_moved_aside_by_a_killed_overwrite_comes_back(small_data: Path, tmp_path):
    out = tmp_path / "run"
    assert run_cae(train_args(small_data, out, "--no-tracking"))[0] == 0
    before = files_under(out)
    _killed_while_writing("training", out)
    assert not (out / "checkpoints" / "last.pt").exists()
    assert (
        run_cae(train_args(small_data, out, "--no-tracking", "--epochs", "2", "--resume"))[0] == 0
    )
    assert read_checkpoint(out)["epoch"] == 2, "resumed the training given back"
    assert set(before) <= set(files_under(out))
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_written_files_follow_the_umask(small_data: Path, tmp_path: Path, umask: int):
    previous = os.umask(umask)
    try:
        out = tmp_path / "run"
        assert run_cae(train_args(small_data, out, "--no-tracking"))[0] == 0
        assert run_cae(["synth", "--out", str(tmp_path / "data"), "--cells", "60"])[0] == 0
    finally:
        os.umask(previous)
    for path in [out / "checkpoints" / "last.pt", out / "history.json", out / "settings.json",
                 out / "vocabularies.json", tmp_path / "data" / "truth.json"]:  # fmt: skip
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path
    for folder in [out, out / "checkpoints", tmp_path / "data"]:
        assert stat.S_IMODE(folder.stat().st_mode) == 0o777 & ~umask, folder


def test_a_run_left_running_by_kill_9_is_ended_when_the_training_resumes(small_data, tmp_path):
    out, uri = tmp_path / "run", f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = train_args(small_data, out, "--tracking-uri", uri)
    process = subprocess.Popen(
        [sys.executable, "-m", "cae.cli", *args, "--epochs", "50"],
        stderr=subprocess.DEVNULL,
    )
    checkpoint = out / "checkpoints" / "last.pt"
    deadline = time.monotonic() + 120
    while not checkpoint.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait(timeout=30)
    assert checkpoint.exists(), "the training reached its first checkpoint"
    client = MlflowClient(uri)
    killed = json.loads((out / "tracking" / "run.json").read_text())["run_id"]
    assert client.get_run(killed).info.status == "RUNNING", "what kill -9 leaves"

    epoch = read_checkpoint(out)["epoch"]
    resumed = [*args, "--epochs", str(epoch + 1), "--resume"]
    assert run_cae(resumed)[0] == 0
    assert client.get_run(killed).info.status == "KILLED"
    (experiment,) = [e for e in client.search_experiments() if e.name == "Default"]
    runs = client.search_runs([experiment.experiment_id])
    assert sorted(r.info.status for r in runs) == ["FINISHED", "KILLED"]
    new = next(r for r in runs if r.info.run_id != killed)
    assert new.data.tags["cae.resumed_from_run"] == killed
    assert new.data.params["output.dir"] == str(out)


def test_a_refused_registration_leaves_the_run_as_it_ended(small_data: Path, tmp_path: Path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert run_cae(train_args(small_data, tmp_path / "run", "--tracking-uri", uri))[0] == 0
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("Default").experiment_id])
    for name, alias, part in [("a/b", "champion", "name 'a/b'"), ("ok", "latest", "'latest'")]:
        argv = ["register", "--run-id", run.info.run_id, "--name", name, "--alias", alias,
                "--tracking-uri", uri]  # fmt: skip
        refused(argv, part, "refused")
    assert client.get_run(run.info.run_id).info.status == "FINISHED"
    assert client.search_registered_models() == []


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -1.0, 1e39])
def test_python_counterfactuals_refuse_values_that_are_not_expression(demo_run, value: float):
    import numpy as np

    from cae.errors import DataError
    from cae.train import load_checkpoint

    model = load_checkpoint(demo_run.out_dir)
    x = np.ones((3, len(model.genes)), dtype=np.float64)
    x[2, 5] = value
    source = {f: v.values[0] for f, v in model.vocabularies.by_field.items()}
    with pytest.raises(DataError, match=f"for gene '{model.genes[5]}' in row 2"):
        model.counterfactual(x, source, {})


def test_generate_refused_mid_way_leaves_no_file_and_no_folder(demo_run, demo_data, tmp_path):
    import shutil

    import numpy as np
    import scipy.sparse as sp

    spoiled = tmp_path / "input"
    shutil.copytree(demo_data, spoiled)
    last = sorted(spoiled.glob("*_counts_*.npz"))[-1]
    matrix = sp.load_npz(last).tocsr()
    matrix.data[0] = np.nan
    sp.save_npz(last, matrix)
    out = tmp_path / "new" / "deeper" / "moved.h5ad"
    argv = ["generate", "--model", str(demo_run.out_dir), "--input", str(spoiled),
            "--set", "sex=female", "--out", str(out)]  # fmt: skip
    refused(argv, last.name, "non-finite")
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize(
    ("script", "flags", "part"),
    [
        ("kang.py", ["--data", "no-such-folder"], "data path no-such-folder does not exist"),
        ("kang.py", ["--set", "train.epochs"], "--set 'train.epochs': give KEY=VALUE"),
        ("kang.py", ["--set", "=3"], "--set '=3': give KEY=VALUE"),
        ("kang.py", ["--set", "model.latent_dim=0"], "model.latent_dim = '0'"),
        ("kang.py", ["--seeds", "0,x"], "--seeds '0,x': give whole numbers"),
        ("kang_linear.py", ["--data", "no-such-folder"], "data path no-such-folder does not exist"),
        ("kang_linear.py", ["--ridge", "0"], "'0' is not a comma-separated list of penalties > 0"),
        ("kang_linear.py", ["--ridge", "10,x"], "'10,x' is not a comma-separated list"),
    ],
)
def test_the_kang_experiments_refuse_bad_input_in_one_line(
    script: str,
    flags: list[str],
    part: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The experiment scripts refuse bad input as ``cae`` does: exit 2, the reason in one line
    without a traceback, nothing written (run in this process, as ``python experiments/...``
    would from the repository's root)."""
    root = Path(__file__).parents[1]
    monkeypatch.chdir(root)
    monkeypatch.syspath_prepend(str(root / "experiments"))
    module = importlib.import_module(script.removesuffix(".py"))
    out = ["--out", str(tmp_path / "out")] if script == "kang.py" else []
    monkeypatch.setattr(sys, "argv", [script, *flags, *out])
    try:
        status = module.main()
    except SystemExit as stop:  # argparse's refusals
        status = stop.code
    assert status == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert part in err.strip().splitlines()[-1], err
    assert not (tmp_path / "out").exists()
