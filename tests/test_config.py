"""Tests of ``cae.config``: sources and their precedence, validation errors, flattening."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cae.config import (
    DataConfig,
    LossWeights,
    Settings,
    TrainConfig,
    deep_merge,
    load_settings,
    nest,
    settings_from_dict,
)
from cae.errors import CAEError, ConfigError

DEFAULT_EPOCHS = TrainConfig.model_fields["epochs"].default


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No CAE_* variable of the caller's environment leaks into a test."""
    for name in list(os.environ):
        if name.upper().startswith("CAE_"):
            monkeypatch.delenv(name)


def check_error(err: BaseException, cls: type[CAEError], *parts: str) -> None:
    """``err`` is exactly ``cls`` and its message names every one of ``parts``."""
    assert type(err) is cls, f"expected {cls.__name__}, got {type(err).__name__}: {err}"
    message = str(err)
    for part in parts:
        assert part in message, f"{part!r} not in {message!r}"


def toml(tmp_path: Path, text: str, name: str = "settings.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# --------------------------------------------------------------------------------------------------
# precedence


@pytest.mark.parametrize(
    ("use_toml", "use_env", "use_override", "expected"),
    [
        (False, False, False, DEFAULT_EPOCHS),
        (True, False, False, 4),
        (False, True, False, 5),
        (True, True, False, 5),
        (False, False, True, 6),
        (True, False, True, 6),
        (True, True, True, 6),
    ],
)
def test_precedence(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    use_toml: bool,
    use_env: bool,
    use_override: bool,
    expected: int,
) -> None:
    assert DEFAULT_EPOCHS not in (4, 5, 6)
    config = toml(tmp_path, "[train]\nepochs = 4\n") if use_toml else None
    if use_env:
        monkeypatch.setenv("CAE_TRAIN__EPOCHS", "5")
    overrides = {"train.epochs": 6} if use_override else None
    assert load_settings(config, overrides).train.epochs == expected


def test_sources_merge_per_setting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = toml(tmp_path, "[train]\nepochs = 4\nbatch_size = 32\nlr = 0.5\n")
    monkeypatch.setenv("CAE_TRAIN__BATCH_SIZE", "16")
    settings = load_settings(config, {"train.epochs": 2})
    assert settings.train.epochs == 2  # override
    assert settings.train.batch_size == 16  # environment
    assert settings.train.lr == 0.5  # TOML
    assert settings.train.seed == TrainConfig.model_fields["seed"].default  # default


def test_nested_environment_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CAE_TRAIN__WEIGHTS__TARGET", "2.5")
    monkeypatch.setenv("CAE_DATA__PATH", "/somewhere/else")
    settings = load_settings()
    assert settings.train.weights.target == 2.5
    assert settings.data.path == "/somewhere/else"


@pytest.mark.parametrize("value", ["assay,sex", " assay , sex ,", '["assay", "sex"]'])
def test_fields_from_environment(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("CAE_DATA__FIELDS", value)
    assert load_settings().data.fields == ["assay", "sex"]


def test_fields_from_toml_and_override(tmp_path: Path) -> None:
    config = toml(tmp_path, '[data]\nfields = ["sex", "assay"]\nnull_values = "na,none"\n')
    settings = load_settings(config)
    assert settings.data.fields == ["sex", "assay"]
    assert settings.data.null_values == ["na", "none"]
    assert load_settings(config, {"data.fields": "cell_type"}).data.fields == ["cell_type"]


def test_dotted_and_nested_overrides() -> None:
    settings = load_settings(
        None,
        {
            "train.epochs": 3,
            "train.weights.target": 0.5,
            "train.weights": {"parsimony": 0.25},
            "model": {"latent_dim": 7},
            "output.dir": "runs/x",
        },
    )
    assert settings.train.epochs == 3
    assert settings.train.weights.target == 0.5
    assert settings.train.weights.parsimony == 0.25
    assert settings.model.latent_dim == 7
    assert settings.output.dir == Path("runs/x")


def test_nest() -> None:
    assert nest({"a.b.c": 1, "a.b": {"d": 2}, "a.e": 3, "f": 4}) == {
        "a": {"b": {"c": 1, "d": 2}, "e": 3},
        "f": 4,
    }

    # keys inside a value are literal: choices are keyed by dotted setting names
    assert nest({"t.c": {"model.x": [1]}}) == {"t": {"c": {"model.x": [1]}}}


def test_deep_merge_keeps_siblings_and_the_base() -> None:
    base = {"train": {"epochs": 3, "weights": {"target": 1.0, "parsimony": 0.1}}, "tune": {"a": 1}}
    merged = deep_merge(base, {"train.weights.target": 0.5, "tune": {"b": 2}})
    assert merged == {
        "train": {"epochs": 3, "weights": {"target": 0.5, "parsimony": 0.1}},
        "tune": {"a": 1, "b": 2},
    }
    assert base["train"]["weights"]["target"] == 1.0  # not changed in place


# --------------------------------------------------------------------------------------------------
# errors


def test_invalid_override() -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(None, {"train.epochs": 0})
    check_error(info.value, ConfigError, "train.epochs = 0", "greater than or equal to 1")


def test_invalid_value_in_toml_names_file(tmp_path: Path) -> None:
    config = toml(tmp_path, "[train]\nepochs = 0\n")
    with pytest.raises(ConfigError) as info:
        load_settings(config)
    check_error(info.value, ConfigError, "train.epochs = 0", str(config))


def test_invalid_environment_value(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CAE_TRAIN__EPOCHS", "many")
    with pytest.raises(ConfigError) as info:
        load_settings()
    check_error(info.value, ConfigError, "train.epochs = 'many'", "valid integer")


def test_several_invalid_values_all_named() -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(None, {"train.batch_size": 0, "data.val_fraction": 1.5})
    check_error(info.value, ConfigError, "train.batch_size = 0", "data.val_fraction = 1.5")


@pytest.mark.parametrize(
    ("value", "words"),
    [("", "at least one metadata field"), ("sex,assay,sex", "listed twice: sex")],
)
def test_invalid_fields(value: str, words: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(None, {"data.fields": value})
    check_error(info.value, ConfigError, "data.fields", words)


def test_invalid_choice() -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(None, {"data.transform": "log2"})
    check_error(info.value, ConfigError, "data.transform = 'log2'")


def test_compile_with_grouped_maps_is_refused_and_auto_allowed() -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(None, {"train.compile": "true", "train.context_maps": "grouped"})
    check_error(info.value, ConfigError, "train.context_maps=gather")
    assert load_settings(None, {"train.compile": "true"}).train.context_maps == "auto"


def test_unknown_key_in_toml(tmp_path: Path) -> None:
    config = toml(tmp_path, "[train]\nepoch = 3\n")
    with pytest.raises(ConfigError) as info:
        load_settings(config)
    check_error(info.value, ConfigError, "train.epoch", "Extra inputs", str(config))


def test_unknown_section_in_toml(tmp_path: Path) -> None:
    config = toml(tmp_path, "[trainer]\nepochs = 3\n")
    with pytest.raises(ConfigError) as info:
        load_settings(config)
    check_error(info.value, ConfigError, "trainer", "Extra inputs", str(config))


def test_unknown_override_key() -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(None, {"model.latent": 3})
    check_error(info.value, ConfigError, "model.latent", "Extra inputs")


def test_missing_toml(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as info:
        load_settings(missing)
    check_error(info.value, ConfigError, f"config file {missing} does not exist")


def test_toml_path_is_a_folder(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(tmp_path)
    check_error(info.value, ConfigError, str(tmp_path), "does not exist")


@pytest.mark.parametrize(
    "content", [b"[train\nepochs = 3\n", b"epochs = = 3\n", b"\xff\xfe[train]\n"]
)
def test_malformed_toml(tmp_path: Path, content: bytes) -> None:
    config = tmp_path / "bad.toml"
    config.write_bytes(content)
    with pytest.raises(ConfigError) as info:
        load_settings(config)
    check_error(info.value, ConfigError, f"config file {config} is not valid TOML")


@pytest.mark.parametrize(("name", "value"), [("CAE_TRAIN", "{bad"), ("CAE_DATA", "notjson")])
def test_malformed_json_environment_section(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert type(info.value) is ConfigError
    assert name.removeprefix("CAE_").lower() in str(info.value).lower()


# --------------------------------------------------------------------------------------------------
# flat() and saved settings


def _dotted(tree: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _dotted(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def test_flat() -> None:
    settings = load_settings(
        None,
        {"data.fields": "assay,sex", "train.weights.target": 0.5, "output.dir": "runs/a"},
    )
    flat = settings.flat()
    leaves = dict(_dotted(settings.model_dump()))
    assert set(flat) == {name for name, value in leaves.items() if value is not None}
    assert {"train.threads", "tracking.run_name"}.isdisjoint(flat), "None settings are left out"
    assert all(isinstance(k, str) and isinstance(v, str) and v for k, v in flat.items())
    assert all("." in k for k in flat)
    assert flat["data.fields"] == "assay,sex"
    assert flat["data.val_chunks"] == "[]", "an empty list, as a value that loads back"
    assert load_settings(None, {"data.val_chunks": flat["data.val_chunks"]}).data.val_chunks == []
    assert flat["train.weights.target"] == "0.5"
    assert flat["train.epochs"] == str(DEFAULT_EPOCHS)
    assert flat["output.dir"] == "runs/a"
    assert flat["data.transform"] == "log1p_cp10k"


def test_settings_from_dict_round_trip() -> None:
    settings = load_settings(
        None,
        {
            "data.path": "/data/x.h5ad",
            "data.fields": "assay,sex",
            "data.val_chunks": "2,5",
            "train.epochs": 3,
            "train.weights.target": 0.5,
            "train.threads": 2,
            "output.dir": "runs/a",
        },
    )
    restored = settings_from_dict(settings.model_dump(mode="json"), "checkpoint.pt")
    assert isinstance(restored, Settings)
    assert restored == settings
    assert restored.data.path == "/data/x.h5ad"
    assert restored.data.val_chunks == ["2", "5"]
    assert restored.flat() == settings.flat()


def test_settings_from_dict_invalid_names_source() -> None:
    values = load_settings().model_dump(mode="json")
    values["train"]["epochs"] = -1
    with pytest.raises(ConfigError) as info:
        settings_from_dict(values, "runs/a/checkpoints/last.pt")
    check_error(info.value, ConfigError, "runs/a/checkpoints/last.pt", "train.epochs = -1")


def test_settings_from_dict_ignores_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    values = load_settings().model_dump(mode="json")
    del values["train"]["epochs"]
    monkeypatch.setenv("CAE_TRAIN__EPOCHS", "5")
    assert settings_from_dict(values, "checkpoint.pt").train.epochs == DEFAULT_EPOCHS


def test_section_defaults_are_independent() -> None:
    first = load_settings(None, {"train.weights.target": 0.5, "data.fields": "sex"})
    second = load_settings()
    assert second.train.weights == LossWeights()
    assert second.data.fields == DataConfig.model_fields["fields"].default
    assert first.train.weights.target == 0.5


def test_tune_choices_are_checked_against_the_settings(tmp_path: Path) -> None:
    good = tmp_path / "good.toml"
    good.write_text(
        '[tune.space.choices]\n"model.nonnegative" = ["all", "base"]\n'
        '"train.weights.context_means" = [0, 10]\n'
    )
    choices = load_settings(good).tune.space.choices
    assert choices == {"model.nonnegative": ["all", "base"], "train.weights.context_means": [0, 10]}
    for line, words in [
        ('"model.nonsense" = [1]', ["'model.nonsense'", "not a setting"]),
        ('"model.nonnegative" = ["maybe"]', ["'maybe'", "'all' or 'base'"]),
        ('"train.lr" = []', ["'train.lr'", "empty"]),
    ]:
        bad = tmp_path / "bad.toml"
        bad.write_text(f"[tune.space.choices]\n{line}\n")
        with pytest.raises(ConfigError) as err:
            load_settings(bad)
        check_error(err.value, ConfigError, *words, "bad.toml")
