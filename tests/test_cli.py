"""Tests of the ``cae`` command: help, synth, preprocess, and errors the user can fix."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cae.cli import main
from cae.data.synth import SynthConfig, generate
from cae.errors import ConfigError, DataError, MetadataError


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No CAE_* variable leaks in, and nothing is written to the repository (runs/, data/)."""
    for name in list(os.environ):
        if name.upper().startswith("CAE_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate(
        tmp_path_factory.mktemp("cli") / "data", SynthConfig(n_cells=200, n_genes=20, n_chunks=2)
    )


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    """Run ``python -m cae.cli`` in a real process."""
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("CAE_")}
    return subprocess.run(
        [sys.executable, "-m", "cae.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
    )


def error_line(stderr: str, command: str, *parts: str) -> None:
    """``stderr`` is one ``cae <command>: error: ...`` line naming every one of ``parts``."""
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    assert lines[0].startswith(f"cae {command}: error: "), lines[0]
    for part in parts:
        assert part in lines[0], f"{part!r} not in {lines[0]!r}"


# --------------------------------------------------------------------------------------------------
# help


def test_help_subprocess() -> None:
    result = run_cli("--help")
    assert result.returncode == 0, result.stderr
    for word in ("synth", "preprocess", "train", "--debug", "--version", "CAE_TRAIN__EPOCHS"):
        assert word in result.stdout


@pytest.mark.parametrize(
    ("command", "flags"),
    [
        ("synth", ["--out", "--cells", "--genes", "--chunks", "--seed", "--h5ad", "--overwrite"]),
        (
            "preprocess",
            ["--config", "--data", "--fields", "--expression-glob", "--null-values", "--out"],
        ),
        (
            "train",
            [
                "--config",
                "--data",
                "--fields",
                "--epochs",
                "--batch-size",
                "--val-chunks",
                "--device",
                "--out",
                "--resume",
                "--overwrite",
                "--no-progress",
            ],
        ),
    ],
)
def test_subcommand_help(
    capsys: pytest.CaptureFixture[str], command: str, flags: list[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: cae {command}")
    for flag in flags:
        assert flag in out, flag


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.startswith("cae ")


def test_no_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main([])
    assert info.value.code == 2
    assert "COMMAND" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------
# synth


def test_synth_writes_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "synth"
    args = ["synth", "--out", str(out), "--cells", "200", "--genes", "20", "--chunks", "2"]
    assert main(args) == 0
    expected = {
        "genes.txt",
        "truth.json",
        "synth_counts_0.npz",
        "synth_counts_1.npz",
        "synth_metadata_0.pkl",
        "synth_metadata_1.pkl",
    }
    assert {p.name for p in out.iterdir()} == expected
    assert len((out / "genes.txt").read_text().split()) == 20
    assert f"wrote 200 cells x 20 genes in 2 chunks to {out}" in capsys.readouterr().out


def test_synth_twice_without_overwrite(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "synth"
    args = ["synth", "--out", str(out), "--cells", "50", "--genes", "10", "--chunks", "1"]
    assert main(args) == 0
    truth = (out / "truth.json").read_text()
    capsys.readouterr()
    assert main([*args, "--seed", "1"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    error_line(captured.err, "synth", str(out), "already exists", "--overwrite")
    assert (out / "truth.json").read_text() == truth  # untouched
    assert main([*args, "--seed", "1", "--overwrite"]) == 0
    assert (out / "truth.json").read_text() != truth


def test_synth_twice_subprocess(tmp_path: Path) -> None:
    out = tmp_path / "synth"
    args = ["synth", "--out", str(out), "--cells", "40", "--genes", "10", "--chunks", "2"]
    first = run_cli(*args)
    assert first.returncode == 0, first.stderr
    assert (out / "synth_counts_1.npz").is_file()
    second = run_cli(*args)
    assert second.returncode == 2
    error_line(second.stderr, "synth", str(out), "already exists")


def test_synth_invalid_setting(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["synth", "--out", str(tmp_path / "s"), "--genes", "3"]) == 2
    error_line(capsys.readouterr().err, "synth", "n_genes must be >= 10, got 3")
    assert not (tmp_path / "s").exists()


def test_debug_reraises(tmp_path: Path) -> None:
    out = tmp_path / "synth"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(DataError) as info:
        main(["--debug", "synth", "--out", str(out), "--cells", "20", "--genes", "10"])
    assert type(info.value) is DataError
    assert str(out) in str(info.value)
    assert (out / "keep.txt").read_text() == "mine"


# --------------------------------------------------------------------------------------------------
# preprocess


def test_preprocess(data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "pre"
    args = ["preprocess", "--data", str(data), "--fields", "cell_type,sex", "--out", str(out)]
    assert main(args) == 0
    vocabularies = json.loads((out / "vocabularies.json").read_text())
    assert list(vocabularies) == ["cell_type", "sex"]
    assert vocabularies["sex"] == {"<unk>": 0, "female": 1, "male": 2}
    assert len(vocabularies["cell_type"]) == 6
    specs = json.loads((out / "field_specs.json").read_text())
    assert [spec["field"] for spec in specs] == ["cell_type", "sex"]
    assert all(spec["n_cells"] == 200 and spec["using"] for spec in specs)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:3] == ["cell_type", "5", "values"]
    assert lines[0].endswith("used")
    assert lines[1].split()[:3] == ["sex", "2", "values"]
    assert lines[2] == f"wrote {out / 'vocabularies.json'} and {out / 'field_specs.json'}"


def test_preprocess_default_out_and_env_fields(
    data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    copy = tmp_path / "data"
    copy.mkdir()
    for file in data.iterdir():
        (copy / file.name).write_bytes(file.read_bytes())
    monkeypatch.setenv("CAE_DATA__FIELDS", "assay")
    assert main(["preprocess", "--data", str(copy)]) == 0
    vocabularies = json.loads((copy / "preprocessed" / "vocabularies.json").read_text())
    assert list(vocabularies) == ["assay"]
    assert capsys.readouterr().out.startswith("assay ")


def test_preprocess_missing_field(
    data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "pre"
    args = ["preprocess", "--data", str(data), "--fields", "cell_type,tissue", "--out", str(out)]
    assert main(args) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    error_line(captured.err, "preprocess", "synth_metadata_0.pkl", "no field 'tissue'")
    assert not (out / "vocabularies.json").exists()


def test_preprocess_missing_data(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "absent"
    assert main(["preprocess", "--data", str(missing), "--fields", "sex"]) == 2
    error_line(capsys.readouterr().err, "preprocess", f"data path {missing} does not exist")


def test_preprocess_bad_config_path(
    data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "nope.toml"
    args = ["preprocess", "--config", str(config), "--data", str(data), "--fields", "sex"]
    assert main(args) == 2
    error_line(capsys.readouterr().err, "preprocess", f"config file {config} does not exist")


def test_preprocess_config_file(
    data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "settings.toml"
    config.write_text(f'[data]\npath = "{data}"\nfields = "sex"\n')
    out = tmp_path / "pre"
    assert main(["preprocess", "--config", str(config), "--out", str(out)]) == 0
    assert list(json.loads((out / "vocabularies.json").read_text())) == ["sex"]
    # a flag beats the file
    assert (
        main(["preprocess", "--config", str(config), "--fields", "assay", "--out", str(out)]) == 0
    )
    assert list(json.loads((out / "vocabularies.json").read_text())) == ["assay"]


def test_preprocess_debug_reraises(data: Path) -> None:
    with pytest.raises(MetadataError) as info:
        main(["--debug", "preprocess", "--data", str(data), "--fields", "tissue"])
    assert type(info.value) is MetadataError
    assert "'tissue'" in str(info.value)


# --------------------------------------------------------------------------------------------------
# train (only errors: training itself is tested elsewhere)


def test_train_bad_config_path(
    data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "missing.toml"
    assert main(["train", "--config", str(config), "--data", str(data)]) == 2
    error_line(capsys.readouterr().err, "train", str(config), "does not exist")


def test_train_invalid_flag_value(data: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--data", str(data), "--epochs", "0"]) == 2
    error_line(capsys.readouterr().err, "train", "train.epochs = 0")


def test_train_debug_reraises_config_error(data: Path) -> None:
    with pytest.raises(ConfigError) as info:
        main(["--debug", "train", "--data", str(data), "--epochs", "0"])
    assert type(info.value) is ConfigError
    assert "train.epochs" in str(info.value)


def test_train_error_subprocess(data: Path, tmp_path: Path) -> None:
    args = ["-q", "train", "--data", str(data), "--fields", "nope", "--out", str(tmp_path / "run")]
    result = run_cli(*args, "--device", "cpu", "--no-progress")
    assert result.returncode == 2
    error_line(result.stderr, "train", "no field 'nope'")


def test_train_non_numeric_val_chunk(
    data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["train", "--data", str(data), "--fields", "sex", "--out", str(tmp_path / "run")]
    assert main([*args, "--val-chunks", "abc", "--device", "cpu", "--no-progress"]) == 2
    error_line(capsys.readouterr().err, "train", "abc")


def test_each_epoch_trains_at_its_scheduled_rate_and_resume_takes_the_settings_given(
    tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--lr-schedule cosine``: epoch 2 of 2 runs at half the rates (the checkpoint's optimiser
    state holds the last epoch's); a resume under ``constant`` goes back to the rates given."""
    from cae.train.checkpoint import read_checkpoint

    out = tmp_path / "run"
    args = ["train", "--data", str(tiny), "--out", str(out), "--latent-dim", "8", "--no-tracking",
            "--no-progress", "--num-workers", "0", "--lr", "0.01"]  # fmt: skip

    def rates() -> tuple[float, float]:
        saved = read_checkpoint(out)
        return tuple(
            saved[k]["param_groups"][0]["lr"] for k in ("optimizer", "classifier_optimizer")
        )

    assert main([*args, "--epochs", "2", "--lr-schedule", "cosine"]) == 0
    assert rates() == pytest.approx((0.005, 0.0005))
    assert main([*args, "--epochs", "3", "--resume", "--lr-schedule", "constant"]) == 0
    assert rates() == pytest.approx((0.01, 0.001))
    capsys.readouterr()
    assert main([*args, "--epochs", "4", "--resume", "--lr-schedule", "linear"]) == 2
    error_line(
        capsys.readouterr().err, "train", "train.lr_schedule = 'linear'", "'constant' or 'cosine'"
    )


def test_resume_without_data_goes_on_with_the_checkpoints_data(
    small_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """README's `cae train --out runs/x --epochs 20 --resume`: not the demo data, silently; and
    without the moving average it was begun without (an older default), not refused."""
    out = tmp_path / "run"
    first = ["train", "--data", str(small_data), "--fields", "assay,sex", "--out", str(out),
             "--epochs", "1", "--latent-dim", "8", "--no-tracking", "--no-progress",
             "--num-workers", "0"]  # fmt: skip
    monkeypatch.setenv("CAE_TRAIN__EMA", "0")
    assert main(first) in (None, 0)
    monkeypatch.delenv("CAE_TRAIN__EMA")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    resume = ["train", "--out", str(out), "--epochs", "2", "--resume", "--no-tracking",
              "--no-progress"]  # fmt: skip
    assert main(resume) in (None, 0), capsys.readouterr().err
    assert not (elsewhere / "data").exists(), "no demo data was written"
    from cae.train.checkpoint import read_checkpoint

    saved = read_checkpoint(out)
    assert saved["epoch"] == 2 and saved["settings"]["data"]["path"] == str(small_data)
    assert saved["settings"]["data"]["fields"] == ["assay", "sex"]
    assert saved["averaged"] is None and saved["settings"]["train"]["ema"] == 0.0
    capsys.readouterr()
    disagreeing = [
        ("--fields", "sex", "data.fields"),
        ("--latent-dim", "16", "model.latent_dim"),
        ("--data", str(tmp_path), "data.path"),
    ]
    for flag, value, key in disagreeing:
        assert main([*resume, "--epochs", "3", flag, value]) == 2
        err = capsys.readouterr().err.strip()
        assert key in err and "--resume continues" in err and len(err.splitlines()) == 1
    agreeing = [*resume, "--epochs", "3", "--data", str(small_data), "--latent-dim", "8"]
    assert main(agreeing) in (None, 0), "flags that agree with the checkpoint are fine"
