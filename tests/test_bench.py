"""Every benchmark runs with --quick and writes a JSON result of the documented shape (no times are
asserted: the numbers of a smoke run on a shared machine mean nothing)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).parents[1] / "bench"

EXPECTED = {
    "context_maps": (
        {"cases"},
        {"cardinality", "batch", "seed_ms", "grouped_ms", "gather_ms", "speedup", "floor_ms"},
    ),
    "train_step": (
        {"cases"},
        {"genes", "ours_cells_per_s", "seed_cells_per_s", "speedup", "ours_fraction_of_roofline"}
        | {"ours_few_fraction_of_roofline"},
    ),
    "loader": (
        {"raw_cells_per_s", "loader_cells_per_s", "seed_cells_per_s", "loader_over_raw"}
        | {"train_step", "peak_rss", "peak_rss_ratio"},
        set(),
    ),
    "preprocess": ({"rows", "vectorised_s", "loop_s", "speedup"}, set()),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_bench_quick_run_writes_its_result(name: str, tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(BENCH / f"{name}.py"), "--quick", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip(), "a benchmark prints its summary lines"
    result = json.loads((tmp_path / f"{name}.json").read_text())
    keys, case_keys = EXPECTED[name]
    assert keys | {"machine"} <= set(result)
    assert {"cpu", "torch_threads", "torch"} <= set(result["machine"])
    for case in result.get("cases", []):
        assert case_keys <= set(case)
        assert all(case[k] > 0 for k in case_keys if isinstance(case[k], float))


def test_every_benchmark_is_tested_and_run_by_make_bench() -> None:
    scripts = {p.stem for p in BENCH.glob("*.py")} - {"measure", "seed_reference"}
    assert scripts == set(EXPECTED)
    makefile = (BENCH.parent / "Makefile").read_text()
    for name in scripts:
        assert f"bench/{name}.py" in makefile
