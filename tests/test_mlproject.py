"""The MLproject file and its environment spec stay in step with the package."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


def test_python_env_lists_the_packages_runtime_dependencies():
    """MLflow caches a plain `mlflow run .` environment by this list: it must follow pyproject."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    env = yaml.safe_load((REPO / "mlproject" / "python_env.yaml").read_text())
    runtime = [d for d in project["dependencies"] if not d.startswith("torch")]
    wanted = runtime + project["optional-dependencies"]["soma"]  # SOMA experiments as data
    listed = env["dependencies"]
    assert listed[0] == "torch==2.13.0", "torch first, pinned to the wheel on this machine's disk"
    assert listed[1:-1] == wanted
    assert listed[-1] == "-e ."


def test_entry_points_are_one_cae_command_each():
    project = yaml.safe_load((REPO / "MLproject").read_text())
    assert project["python_env"] == "mlproject/python_env.yaml"
    points = project["entry_points"]
    assert set(points) == {"main", "preprocess", "synth"}
    for point in points.values():
        assert point["command"].startswith("cae ")
    for point in points.values():
        for name, spec in point["parameters"].items():
            assert str(spec.get("default", "")) != "", f"{name}: MLflow would log '' for it"
            assert f"{{{name}}}" in point["command"], name
    # Everything else reaches `cae train` as MLflow appends undeclared -P parameters: --name value
    assert set(points["main"]["parameters"]) == {"fields", "data", "config"}


def test_undeclared_parameters_reach_cae_train_as_mlflow_appends_them(capsys):
    """`-P latent_dim=8` becomes `--latent_dim 8`: cae train takes the underscored spelling of
    every flag that has a value, without listing it in --help."""
    from cae.cli import build_parser, main

    args = build_parser().parse_args(["train", "--latent_dim", "8", "--obs_filter", "sex == 'F'"])
    assert getattr(args, "model.latent_dim") == 8
    assert getattr(args, "data.soma_obs_filter") == "sex == 'F'"
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    help_text = capsys.readouterr().out
    assert "--latent-dim" in help_text and "--latent_dim" not in help_text
