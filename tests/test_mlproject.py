"""The MLproject file and its environment spec stay in step with the package."""

from __future__ import annotations

import tomllib
from pathlib import Path

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
    main = points["main"]["parameters"]
    required = {"fields", "data", "epochs", "latent_dim", "logit_scale", "lr", "batch_size"}
    assert required | {"seed", "config"} <= set(main)
    assert all("default" in spec for spec in main.values()), "every parameter has a default"
    for name in main:
        assert f"{{{name}}}" in points["main"]["command"], name
