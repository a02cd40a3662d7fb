"""Fuzzing the settings of ``cae train``: any flags, any TOML file, any ``CAE_*`` variable.

For every example the real command either trains (and its contributions are finite) or exits with
status 2 and one line naming the setting, and then nothing is written: no output folder, no
MLflow store. Never a traceback.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pandas as pd
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.fuzzing import fuzz_settings, run_cae

pytestmark = [pytest.mark.fuzz, pytest.mark.usefixtures("isolated")]

FIELDS = ["cell_type", "assay", "sex"]

# Values a careless or hostile user types: numbers at and past every edge, text where numbers
# go, separators, control characters, nothing at all.
HOSTILE_TEXT = st.one_of(
    st.sampled_from(["", " ", "nan", "inf", "-inf", "1e400", "-0", "0x10", "1_000", "None",
                     "null", "[]", "[1,", "{}", ",", ";", "=", "a=b", "../..", "/", "\x00",
                     "\n", "é", "🧬", "true", "cuda:99", "cpu ", " cpu", "2**64"]),
    st.text(max_size=12),
)  # fmt: skip
INTS = st.one_of(
    st.integers(-3, 4),
    st.sampled_from([2**31, 2**32, 2**63, -(2**63), 10**30]),
).map(str)
FLOATS = st.one_of(
    st.floats(allow_subnormal=False),  # training flushes denormals process-wide
    st.sampled_from([0.0, 1e-300, 1e300, -1e-3]),
).map(repr)

# flag -> what may follow it (valid values mixed with hostile ones); epochs stay at one
FLAGS: dict[str, st.SearchStrategy[str]] = {
    "--fields": st.one_of(
        st.lists(st.sampled_from([*FIELDS, "nope", "a/b", "x=y", ""]), min_size=1, max_size=3).map(
            ",".join
        ),
        HOSTILE_TEXT,
    ),
    "--transform": st.one_of(st.sampled_from(["log1p_cp10k", "none"]), HOSTILE_TEXT),
    "--val-fraction": st.one_of(FLOATS, HOSTILE_TEXT),
    "--val-chunks": st.one_of(st.sampled_from(["0", "1", "0,1,2", "7", "-1"]), HOSTILE_TEXT),
    "--exclude": st.one_of(
        st.sampled_from(["sex=female", "cell_type=B,sex=male", "nope=x", "sex=", "sex"]),
        HOSTILE_TEXT,
    ),
    "--null-values": HOSTILE_TEXT,
    "--shuffle-chunks": st.one_of(INTS, HOSTILE_TEXT),
    "--batch-size": st.one_of(st.integers(1, 300).map(str), INTS, HOSTILE_TEXT),
    "--lr": st.one_of(FLOATS, HOSTILE_TEXT),
    "--lr-schedule": st.one_of(st.sampled_from(["constant", "cosine", "Cosine", ""]), HOSTILE_TEXT),
    "--seed": st.one_of(INTS, HOSTILE_TEXT),
    "--device": st.one_of(st.sampled_from(["auto", "cpu", "cuda", "mps", "cuda:1"]), HOSTILE_TEXT),
    "--latent-dim": st.one_of(st.integers(1, 64).map(str), INTS, HOSTILE_TEXT),
    "--logit-scale": st.one_of(FLOATS, HOSTILE_TEXT),
    "--epochs": st.sampled_from(["1", "0", "-1", "x", "", "1.5"]),
    "--num-workers": st.sampled_from(["0", "-1", "x", "", "65", "1e3"]),
}


_count = itertools.count()


def _check(argv: list[str], out: Path, workdir: Path) -> None:
    status, err = run_cae(argv)
    if status == 2:
        assert not out.exists(), f"refused ({err}) but {out} was written"
        assert not (workdir / "mlflow.db").exists(), f"refused ({err}) but a run was started"
        return
    table = pd.read_csv(out / "contributions.csv")
    assert all(math.isfinite(v) for v in table.select_dtypes("number").to_numpy().ravel())


@fuzz_settings(short=25)
@given(st.dictionaries(st.sampled_from(sorted(FLAGS)), st.just(None), max_size=5).flatmap(
    lambda chosen: st.fixed_dictionaries({flag: FLAGS[flag] for flag in chosen})
))  # fmt: skip
def test_any_flags_train_or_are_refused_in_one_line(tiny: Path, tmp_path: Path, flags):
    out = tmp_path / f"run-{next(_count)}"
    argv = ["train", "--data", str(tiny), "--out", str(out), "--no-tracking", "--no-progress"]
    if "--epochs" not in flags:
        argv += ["--epochs", "1"]
    if "--num-workers" not in flags:
        argv += ["--num-workers", "0"]
    for flag, value in flags.items():
        argv.append(f"{flag}={value}")  # "=" keeps a value starting with "-" a value
    _check(argv, out, tmp_path)


TOML_VALUES = st.one_of(
    st.integers(), st.floats(allow_subnormal=False), st.text(max_size=8), st.booleans(),
    st.lists(st.integers(), max_size=3),
)  # fmt: skip
SECTIONS: dict[str, list[str]] = {
    "data": ["fields", "val_fraction", "transform", "shuffle_chunks", "nope"],
    "model": ["latent_dim", "logit_scale", "nonnegative", "counterfactual"],
    "train": ["lr", "seed", "batch_size", "device", "ema", "weights"],
    "nope": ["x"],
}
KEYS = sorted({key for keys in SECTIONS.values() for key in keys})


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    if isinstance(value, float) and math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return repr(value) if not isinstance(value, list) else "[" + ", ".join(map(str, value)) + "]"


@fuzz_settings(short=15)
@given(
    st.one_of(
        st.dictionaries(
            st.sampled_from(sorted(SECTIONS)),
            st.dictionaries(st.sampled_from(KEYS), TOML_VALUES, max_size=3),
            max_size=3,
        ).map(
            lambda tree: "\n".join(
                f"[{section}]\n" + "\n".join(f"{k} = {_toml_value(v)}" for k, v in items.items())
                for section, items in tree.items()
            )
        ),
        st.binary(max_size=64),
    )
)
def test_any_config_file_trains_or_is_refused_in_one_line(
    tiny: Path, tmp_path: Path, content: str | bytes
):
    number = next(_count)
    config, out = tmp_path / f"config-{number}.toml", tmp_path / f"run-{number}"
    config.write_bytes(content.encode() if isinstance(content, str) else content)
    argv = ["train", "--config", str(config), "--data", str(tiny), "--out", str(out),
            "--no-tracking", "--no-progress", "--epochs", "1", "--num-workers", "0",
            "--fields", "cell_type,sex"]  # fmt: skip
    _check(argv, out, tmp_path)


@fuzz_settings(short=15)
@given(
    st.sampled_from(["CAE_TRAIN__LR", "CAE_DATA__FIELDS", "CAE_TRAIN", "CAE_MODEL__LATENT_DIM",
                     "CAE_DATA__EXCLUDE", "CAE_TRAIN__WEIGHTS", "CAE_SERVE__MAX_ROWS"]),
    HOSTILE_TEXT,
)  # fmt: skip
def test_any_environment_variable_trains_or_is_refused_in_one_line(
    tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, value: str
):
    if "\x00" in value:
        return  # the environment cannot hold it
    out = tmp_path / f"run-{next(_count)}"
    monkeypatch.setenv(name, value)
    argv = ["train", "--data", str(tiny), "--out", str(out), "--no-tracking", "--no-progress",
            "--epochs", "1", "--num-workers", "0", "--fields", "cell_type,sex"]  # fmt: skip
    _check(argv, out, tmp_path)
