"""Data sorted by a field, as atlas exports are, train to the answer of the same cells shuffled.

The demo data (6 chunks of shuffled cells) against the same cells written sorted by assay or by
cell_type (``cae synth --sort-by``, 4 of 6 chunks then hold one assay), trained with the demo
preset and the earlier defaults' model (``EARLIER_MODEL``: its effects vary little from run to
run, so a difference is the loader's): the shuffle windows mix the chunks, so the per-field
effects, their ranking and the assay classifier's target accuracy match. Windows of one chunk
(batches from one chunk, as the loader once drew them) get assay wrong: the test can fail.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from cae.data.synth import SynthConfig, generate
from cae.train import TrainResult, train
from tests.conftest import EARLIER_MODEL, demo_settings

pytestmark = pytest.mark.slow
FIELDS = ["cell_type", "assay", "sex"]  # the truth's ranking, largest effect first


def effects(result: TrainResult) -> dict[str, float]:
    return {field: result.final[f"effect_l2/{field}"] for field in FIELDS}


@pytest.fixture(scope="module")
def sorted_data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("sorted")
    return {f: generate(folder / f, SynthConfig(sort_by=f)) for f in ("assay", "cell_type")}


@pytest.fixture(scope="module")
def shuffled_run(demo_data: Path, tmp_path_factory: pytest.TempPathFactory) -> TrainResult:
    """The demo data (shuffled cells) with the earlier defaults' model."""
    return train(demo_settings(demo_data, tmp_path_factory.mktemp("shuffled"), **EARLIER_MODEL))


@pytest.mark.parametrize("field", ["assay", "cell_type"])
def test_sorted_chunks_train_like_the_same_cells_shuffled(
    field: str, sorted_data: dict[str, Path], shuffled_run: TrainResult, tmp_path: Path
):
    shuffled = effects(shuffled_run)
    result = train(demo_settings(sorted_data[field], tmp_path / "run", **EARLIER_MODEL))
    found = effects(result)
    assert sorted(FIELDS, key=lambda f: -found[f]) == FIELDS, found
    assert result.final["val/target_accuracy/assay"] >= 0.95
    for name in FIELDS:
        assert found[name] == pytest.approx(shuffled[name], rel=0.10), (name, found, shuffled)
    assert result.history[-1][f"train/single_value_batches/{field}"] == 0.0


def test_batches_from_one_chunk_get_sorted_assay_wrong(
    sorted_data: dict[str, Path], tmp_path: Path
):
    one_chunk = {"data.shuffle_chunks": 1, **EARLIER_MODEL}
    result = train(demo_settings(sorted_data["assay"], tmp_path / "run", **one_chunk))
    assert result.history[-1]["train/single_value_batches/assay"] > 0.5
    assert result.final["val/target_accuracy/assay"] < 0.95
