"""Metadata preprocessing: our vectorised field specs + encoding versus a per-value Python loop
(how a straightforward preprocessor walks the rows), measured side by side in one run.

    python bench/preprocess.py [--rows 2000000] [--quick]

Prints one line per case and the ratio, and writes bench/results/preprocess.json.
"""

from __future__ import annotations

import time

import numpy as np
import pandas as pd
from measure import arguments, write_result

from cae.data.vocabulary import DEFAULT_NULL_VALUES, Vocabularies, build_field_specs

FIELDS = ["cell_type", "assay", "sex"]


def census_like(rows: int) -> pd.DataFrame:
    """Census-like metadata: 790 cell types, 26 assays (categorical), 3 sexes, with "unknown"."""
    rng = np.random.default_rng(0)
    return pd.DataFrame(
        {
            "cell_type": rng.choice([f"type_{i}" for i in range(790)] + ["unknown"], rows),
            "assay": pd.Categorical(rng.choice([f"assay_{i}" for i in range(26)], rows)),
            "sex": rng.choice(["female", "male", "unknown"], rows),
        }
    )


def vectorised(frame: pd.DataFrame) -> np.ndarray:
    specs = build_field_specs([("bench", frame)], FIELDS)
    return Vocabularies.from_specs(specs).encode(frame, source="bench")


def per_value_loop(frame: pd.DataFrame) -> np.ndarray:
    nulls = set(DEFAULT_NULL_VALUES)
    codes = np.zeros((len(frame), len(FIELDS)), dtype=np.int64)
    for column, field in enumerate(FIELDS):
        counts: dict[str, int] = {}
        for value in frame[field]:
            if value is None or str(value).strip().lower() in nulls:
                continue
            counts[str(value)] = counts.get(str(value), 0) + 1
        index = {value: i + 1 for i, value in enumerate(sorted(counts))}
        for row, value in enumerate(frame[field]):
            codes[row, column] = index.get(str(value), 0)
    return codes


def timed(function, frame: pd.DataFrame) -> tuple[float, np.ndarray]:
    start = time.perf_counter()
    result = function(frame)
    return time.perf_counter() - start, result


def main() -> None:
    parser = arguments(__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=2_000_000)
    args = parser.parse_args()
    if args.quick:
        args.rows = 20_000
    frame = census_like(args.rows)
    fast, ours = timed(vectorised, frame)
    slow, reference = timed(per_value_loop, frame)
    assert np.array_equal(ours, reference), "both encode the same indices"
    print(f"vectorised      {args.rows:,} rows x {len(FIELDS)} fields: {fast:7.2f} s")
    print(f"per-value loop  {args.rows:,} rows x {len(FIELDS)} fields: {slow:7.2f} s")
    print(f"speed-up: {slow / fast:.1f}x")
    result = {"rows": args.rows, "vectorised_s": fast, "loop_s": slow, "speedup": slow / fast}
    write_result(args.out, "preprocess", result)


if __name__ == "__main__":
    main()
