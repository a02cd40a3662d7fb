"""Tests of cae.data.vocabulary: null handling, field specs, vocabularies and their files."""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from cae.data.vocabulary import (
    DEFAULT_NULL_VALUES,
    UNK,
    UNK_INDEX,
    FieldCounter,
    FieldSpec,
    FieldVocabulary,
    Vocabularies,
    build_field_specs,
    canonical_values,
    load_preprocessed,
    require_usable,
    save_preprocessed,
)
from cae.errors import DataError, MetadataError


def _frame() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "cell_type": ["T cell", "B cell", "unknown", "T cell", None, "NK cell", "T cell"],
            "sex": ["female", "male", "female", " NA ", "male", "female", np.nan],
            "assay": ["10x 3' v3"] * 6 + ["unknown"],
            "disease": ["unknown", "na", None, "Unknown", "NULL", "", " none "],
            "donor_id": [f"d{i}" for i in range(7)],
        }
    )


# -- canonical values and nulls ------------------------------------------------------------------


def test_error_hierarchy() -> None:
    assert issubclass(MetadataError, DataError)


@pytest.mark.parametrize("spelling", [*DEFAULT_NULL_VALUES, UNK])
def test_every_null_spelling_any_case_and_spaces_is_null(spelling: str) -> None:
    variants = [
        spelling,
        spelling.upper(),
        spelling.title(),
        f"  {spelling}\t",
        f" {spelling.upper()} ",
    ]
    column = pd.Series(["x", *variants, "y"], dtype=object)
    codes, uniques = canonical_values(column, DEFAULT_NULL_VALUES, source="f.pkl", field="sex")
    assert uniques == ["x", "y"]
    assert codes.tolist() == [0] + [-1] * len(variants) + [1]

    vocab = FieldVocabulary("sex", ("x", "y"))
    assert vocab.encode(column, source="f.pkl").tolist() == [1] + [UNK_INDEX] * len(variants) + [2]


def test_nan_none_and_pd_na_are_null_in_every_dtype() -> None:
    columns = [
        pd.Series(["a", None, np.nan, pd.NA, "b"], dtype=object),
        pd.Series(["a", None, None, None, "b"], dtype="string"),
        pd.Series(pd.Categorical(["a", None, np.nan, None, "b"])),
    ]
    for column in columns:
        codes, uniques = canonical_values(column, DEFAULT_NULL_VALUES, source="f", field="x")
        assert uniques == ["a", "b"]
        assert codes.dtype == np.int64
        assert codes.tolist() == [0, -1, -1, -1, 1]


def test_real_values_keep_their_spelling_and_configured_nulls_apply() -> None:
    column = pd.Series([" Female", "female", "FEMALE", "missing", "unknown"])
    codes, uniques = canonical_values(column, ("missing",), source="f", field="sex")
    # "unknown" is not null when the configured spellings do not include it.
    assert uniques == [" Female", "female", "FEMALE", "unknown"]
    assert codes.tolist() == [0, 1, 2, -1, 3]


@pytest.mark.parametrize(
    "values",
    [
        [3, "3"],
        ["a", 1.5],
        [1, 2.5],
        [True, 1],  # equal values of different types: pd.factorize merges them
        [1, 1.0],
        [np.float64(2.5), "x", np.float64(2.5)],
    ],
)
def test_mixed_types_in_a_column_raise(values: list) -> None:
    column = pd.Series(["unknown", *values], dtype=object)
    with pytest.raises(MetadataError) as info:
        canonical_values(column, DEFAULT_NULL_VALUES, source="human_metadata_003.pkl", field="x")
    message = str(info.value)
    assert "human_metadata_003.pkl" in message
    assert "'x'" in message
    assert "strings" in message
    assert type(values[0]).__name__ in message and type(values[1]).__name__ in message


def test_numpy_and_python_scalars_of_one_family_are_one_type() -> None:
    column = pd.Series([3, np.int64(4), np.int32(5), None], dtype=object)
    codes, uniques = canonical_values(column, DEFAULT_NULL_VALUES, source="f", field="x")
    assert uniques == ["3", "4", "5"]
    assert codes.tolist() == [0, 1, 2, -1]
    column = pd.Series([1.5, np.float32(2.0), "unknown", np.float64(1.5)], dtype=object)
    codes, uniques = canonical_values(column, DEFAULT_NULL_VALUES, source="f", field="x")
    assert uniques == ["1.5", "2.0"]
    assert codes.tolist() == [0, 1, -1, 0]
    column = pd.Series([True, np.True_, "NA", False], dtype=object)
    codes, uniques = canonical_values(column, DEFAULT_NULL_VALUES, source="f", field="x")
    assert (uniques, codes.tolist()) == (["True", "False"], [0, 0, -1, 1])


def test_repeated_column_name_raises() -> None:
    frame = pd.DataFrame([["a", "b"], ["c", "d"]], columns=["sex", "sex"])
    with pytest.raises(MetadataError, match=r"f\.pkl.*'sex'"):
        build_field_specs([("f.pkl", frame)], ["sex"])


# -- field specs --------------------------------------------------------------------------------


def test_counts_and_fractions_are_exact() -> None:
    specs = build_field_specs([("m.pkl", _frame())], ["cell_type", "sex"])
    assert list(specs) == ["cell_type", "sex"]
    cell_type = specs["cell_type"]
    assert cell_type.counts == {"B cell": 1, "NK cell": 1, "T cell": 3}
    assert list(cell_type.counts) == sorted(cell_type.counts)
    assert (cell_type.n_cells, cell_type.n_null, cell_type.cardinality) == (7, 2, 3)
    assert cell_type.non_null_fraction == 5 / 7
    assert cell_type.using and cell_type.reason is None
    sex = specs["sex"]
    assert sex.counts == {"female": 3, "male": 2}
    assert (sex.n_null, sex.non_null_fraction) == (2, 5 / 7)


def test_single_value_and_all_null_fields_are_skipped_with_a_reason() -> None:
    specs = build_field_specs([("m.pkl", _frame())], ["assay", "disease", "sex", "donor_id"])
    assert not specs["assay"].using
    assert specs["assay"].reason == "only one known value ('10x 3' v3') in 7 cells"
    assert not specs["disease"].using
    assert specs["disease"].cardinality == 0 and specs["disease"].n_null == 7
    assert "every value is null" in specs["disease"].reason
    assert specs["sex"].using and specs["donor_id"].using

    vocabularies = Vocabularies.from_specs(specs)
    assert vocabularies.fields == ("sex", "donor_id")


def test_training_refuses_unusable_fields_naming_each_and_what_to_do() -> None:
    specs = build_field_specs([("m.pkl", _frame())], ["assay", "disease", "sex"])
    with pytest.raises(MetadataError) as info:
        require_usable(specs, "data/x")
    message = str(info.value)
    assert message.startswith("data/x: field 'assay': only one known value ('10x 3' v3')")
    assert "field 'disease': every value is null (7 cells)" in message
    assert "drop assay, disease from data.fields (--fields sex)" in message
    with pytest.raises(MetadataError, match=r"choose other fields in data\.fields"):
        require_usable(build_field_specs([("m.pkl", _frame())], ["assay"]), "data/x")
    require_usable(build_field_specs([("m.pkl", _frame())], ["sex", "cell_type"]), "data/x")


def test_from_specs_with_nothing_usable_lists_every_reason() -> None:
    specs = build_field_specs([("m.pkl", _frame())], ["assay", "disease"])
    with pytest.raises(MetadataError) as info:
        Vocabularies.from_specs(specs)
    message = str(info.value)
    assert "'assay'" in message and "only one known value" in message
    assert "'disease'" in message and "every value is null" in message


def test_missing_field_names_source_field_and_columns() -> None:
    frames = [("a.pkl", _frame()), ("human_metadata_003.pkl", _frame().drop(columns="sex"))]
    with pytest.raises(MetadataError) as info:
        build_field_specs(frames, ["cell_type", "sex"])
    message = str(info.value)
    assert "human_metadata_003.pkl" in message and "'sex'" in message
    assert "'donor_id'" in message  # lists the columns the file has


def test_missing_field_lists_only_the_first_columns() -> None:
    frame = pd.DataFrame({f"col{i}": [1] for i in range(30)})
    with pytest.raises(MetadataError, match=r"and 10 more"):
        build_field_specs([("f.pkl", frame)], ["sex"])


def test_empty_field_list_raises() -> None:
    with pytest.raises(MetadataError, match="No metadata fields"):
        build_field_specs([("m.pkl", _frame())], [])


def test_counts_accumulate_across_frames() -> None:
    frames = [
        ("m0.pkl", pd.DataFrame({"sex": ["female", "male", "unknown"]})),
        ("m1.pkl", pd.DataFrame({"sex": pd.Categorical(["male", "male", None, "other"])})),
        ("m2.pkl", pd.DataFrame({"sex": pd.Series([], dtype=object)})),
        ("m3.pkl", pd.DataFrame({"sex": pd.Series(["female", pd.NA], dtype="string")})),
    ]
    spec = build_field_specs(frames, ["sex"])["sex"]
    assert spec.counts == {"female": 2, "male": 3, "other": 1}
    assert (spec.n_cells, spec.n_null, spec.cardinality) == (9, 3, 3)
    assert spec.non_null_fraction == 6 / 9

    counter = FieldCounter("sex")
    for source, frame in frames:
        counter.update(frame["sex"], source=source)
    assert counter.finish() == spec


def test_type_change_between_chunks_names_both_sources() -> None:
    frames = [
        ("first.pkl", pd.DataFrame({"batch": [1, 2, 3]})),
        ("second.pkl", pd.DataFrame({"batch": ["unknown", "unknown"]})),  # all null: no type
        ("third.pkl", pd.DataFrame({"batch": [1.0, np.nan]})),
    ]
    with pytest.raises(MetadataError) as info:
        build_field_specs(frames, ["batch"])
    message = str(info.value)
    assert "first.pkl" in message and "third.pkl" in message and "'batch'" in message
    assert "int" in message and "float" in message


def test_categorical_and_numeric_int_columns() -> None:
    frame = pd.DataFrame(
        {
            "tissue": pd.Categorical(
                ["lung", "blood", None, "lung", "unknown"],
                categories=["unused", "lung", "blood", "unknown"],
            ),
            "batch": np.array([2, 10, 2, 1, 10], dtype=np.int64),
            "plate": pd.array([7, None, 8, 7, 8], dtype="Int64"),
        }
    )
    specs = build_field_specs([("m.pkl", frame)], ["tissue", "batch", "plate"])
    assert specs["tissue"].counts == {"blood": 1, "lung": 2}  # unused categories are not counted
    assert specs["batch"].counts == {"1": 1, "10": 2, "2": 2}
    assert specs["plate"].counts == {"7": 2, "8": 2}
    vocabularies = Vocabularies.from_specs(specs)
    assert vocabularies.by_field["batch"].values == ("1", "10", "2")
    encoded = vocabularies.encode(frame, source="m.pkl")
    assert encoded.dtype == np.int64 and encoded.shape == (5, 3)
    assert encoded[:, 0].tolist() == [2, 1, 0, 2, 0]
    assert encoded[:, 1].tolist() == [3, 2, 3, 1, 2]
    assert encoded[:, 2].tolist() == [1, 0, 2, 1, 2]


# -- vocabularies -------------------------------------------------------------------------------


def test_vocabulary_indices_are_sorted_and_contiguous() -> None:
    frame = pd.DataFrame({"cell_type": ["z", "a", "m", "a", "unknown", "Z"]})
    vocabularies = Vocabularies.from_specs(build_field_specs([("m.pkl", frame)], ["cell_type"]))
    vocab = vocabularies.by_field["cell_type"]
    assert vocab.values == ("Z", "a", "m", "z")
    assert vocab.size == 5
    assert vocab.index_of() == {UNK: 0, "Z": 1, "a": 2, "m": 3, "z": 4}
    assert vocabularies.sizes() == {"cell_type": 5}
    assert vocab.encode(frame["cell_type"], source="m.pkl").tolist() == [4, 2, 3, 2, 0, 1]
    assert vocab.decode(np.array([[0, 1], [4, 2]])).tolist() == [[UNK, "Z"], ["z", "a"]]


def test_encode_of_an_unseen_value_lists_known_values() -> None:
    vocab = FieldVocabulary("cell_type", tuple(f"type{i:02d}" for i in range(25)))
    column = pd.Series(["type00", "unknown", "astrocyte"])
    with pytest.raises(MetadataError) as info:
        vocab.encode(column, source="human_metadata_003.pkl")
    message = str(info.value)
    assert "human_metadata_003.pkl" in message and "'cell_type'" in message
    assert "'astrocyte'" in message
    assert "'type00'" in message and "'type19'" in message and "'type20'" not in message
    assert "... and 5 more" in message
    with pytest.raises(MetadataError, match="astrocyte"):
        vocab.encode_values(["astrocyte"], source="settings")


def test_encode_values_and_decode() -> None:
    vocab = FieldVocabulary("sex", ("female", "male"))
    assert vocab.encode_values(["male", UNK, "Unknown", "female"], source="s").tolist() == [
        2,
        0,
        0,
        1,
    ]
    assert vocab.decode(vocab.encode_values(["male", UNK], source="s")).tolist() == ["male", UNK]
    with pytest.raises(MetadataError):
        vocab.decode(np.array([3]))


def test_vocabularies_encode_requires_every_field() -> None:
    vocabularies = Vocabularies.from_specs(build_field_specs([("m.pkl", _frame())], ["sex"]))
    with pytest.raises(MetadataError, match=r"other\.pkl.*'sex'"):
        vocabularies.encode(pd.DataFrame({"cell_type": ["a"]}), source="other.pkl")


def test_to_dict_from_dict_round_trip() -> None:
    specs = build_field_specs([("m.pkl", _frame())], ["cell_type", "sex", "donor_id"])
    vocabularies = Vocabularies.from_specs(specs)
    d = vocabularies.to_dict()
    assert d["sex"] == {UNK: 0, "female": 1, "male": 2}
    assert list(d) == ["cell_type", "sex", "donor_id"]
    again = Vocabularies.from_dict(json.loads(json.dumps(d)))
    assert again == vocabularies
    for spec in specs.values():
        assert FieldSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec


def test_field_specs_written_with_a_kind_still_read() -> None:
    spec = build_field_specs([("m.pkl", _frame())], ["sex"])["sex"]
    assert FieldSpec.from_dict({**spec.to_dict(), "kind": "categorical"}) == spec
    assert "kind" not in spec.to_dict()


@pytest.mark.parametrize(
    "bad",
    [
        {"sex": {"female": 1, "male": 2}},  # no <unk>
        {"sex": {UNK: 1, "female": 0, "male": 2}},  # <unk> not 0
        {"sex": {UNK: 0, "female": 1, "male": 3}},  # gap
        {"sex": {UNK: 0, "female": 1, "male": 1}},  # repeat
        {"sex": {UNK: 0, "female": "1"}},  # not an int
        {"sex": ["female", "male"]},
        {},
    ],
)
def test_from_dict_rejects_malformed_vocabularies(bad: dict) -> None:
    with pytest.raises(MetadataError, match=r"vocab\.json"):
        Vocabularies.from_dict(bad, source="vocab.json")


def test_save_and_load_round_trip(tmp_path) -> None:
    specs = build_field_specs([("m.pkl", _frame())], ["cell_type", "assay", "sex", "disease"])
    out_dir = tmp_path / "pre" / "processed"
    vocab_path, specs_path = save_preprocessed(out_dir, specs)
    assert vocab_path == out_dir / "vocabularies.json"
    assert specs_path == out_dir / "field_specs.json"
    assert sorted(p.name for p in out_dir.iterdir()) == ["field_specs.json", "vocabularies.json"]
    assert list(json.loads(vocab_path.read_text())) == ["cell_type", "sex"]
    assert [s["field"] for s in json.loads(specs_path.read_text())] == list(specs)

    vocabularies, loaded = load_preprocessed(out_dir)
    assert vocabularies == Vocabularies.from_specs(specs)
    assert loaded == specs
    assert list(loaded) == list(specs)


def test_load_of_missing_or_corrupt_files_names_them(tmp_path) -> None:
    with pytest.raises(MetadataError, match=r"vocabularies\.json"):
        load_preprocessed(tmp_path)
    specs = build_field_specs([("m.pkl", _frame())], ["cell_type", "sex"])
    save_preprocessed(tmp_path, specs)
    (tmp_path / "field_specs.json").write_text("[{]")
    with pytest.raises(MetadataError, match=r"field_specs\.json"):
        load_preprocessed(tmp_path)
    (tmp_path / "field_specs.json").write_text(json.dumps([specs["sex"].to_dict()]))
    with pytest.raises(MetadataError, match="disagree"):
        load_preprocessed(tmp_path)


# -- properties ---------------------------------------------------------------------------------

_NULL_SPELLINGS = st.sampled_from(DEFAULT_NULL_VALUES).flatmap(
    lambda s: st.sampled_from([s, s.upper(), s.title(), f" {s} ", f"\t{s.upper()}"])
)
# Label text: anything but control characters, which labels may not hold (a property below).
_TEXT = st.characters(blacklist_categories=("Cc", "Cs"))
_CELL = st.one_of(
    st.none(),
    st.just(np.nan),
    _NULL_SPELLINGS,
    st.sampled_from(["T cell", "B cell", "Ünïcødé 细胞", "10x 3' v3"]),
    st.text(_TEXT, max_size=6),
)


def _is_null(value: object) -> bool:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return True
    return str(value).strip().lower() in {*DEFAULT_NULL_VALUES, UNK}


@settings(max_examples=50, deadline=None)
@given(
    columns=st.lists(st.lists(_CELL, min_size=0, max_size=30), min_size=1, max_size=3),
    categorical=st.lists(st.booleans(), min_size=3, max_size=3),
    n_chunks=st.integers(1, 3),
)
def test_encode_decode_round_trip_property(
    columns: list[list[object]], categorical: list[bool], n_chunks: int
) -> None:
    n_rows = min(len(c) for c in columns)
    data = {}
    for j, values in enumerate(columns):
        values = values[:n_rows]
        data[f"f{j}"] = (
            pd.Categorical(values) if categorical[j] else pd.Series(values, dtype=object)
        )
    frame = pd.DataFrame(data, index=range(n_rows))
    bounds = np.linspace(0, n_rows, n_chunks + 1).astype(int)
    chunks = [(f"c{i}.pkl", frame.iloc[bounds[i] : bounds[i + 1]]) for i in range(n_chunks)]
    fields = list(frame.columns)

    specs = build_field_specs(chunks, fields)
    for field in fields:
        spec = specs[field]
        original = [columns[fields.index(field)][i] for i in range(n_rows)]
        expected_null = [_is_null(v) for v in original]
        assert spec.n_cells == n_rows
        assert spec.n_null == sum(expected_null)
        assert sum(spec.counts.values()) == spec.n_cells - spec.n_null
        assert spec.using == (spec.cardinality >= 2)

        vocab = FieldVocabulary(field, tuple(sorted(spec.counts)))
        encoded = np.concatenate(
            [vocab.encode(chunk[field], source=source) for source, chunk in chunks]
        )
        assert encoded.dtype == np.int64 and len(encoded) == n_rows
        decoded = vocab.decode(encoded)
        for value, is_null, back in zip(original, expected_null, decoded, strict=True):
            assert back == (UNK if is_null else str(value))


# -- scale --------------------------------------------------------------------------------------


def test_two_million_rows_are_vectorised() -> None:
    n = 2_000_000
    rng = np.random.default_rng(0)
    cell_types = np.array([f"cell type {i}" for i in range(500)] + ["unknown"], dtype=object)
    frame = pd.DataFrame(
        {
            "cell_type": cell_types[rng.integers(0, len(cell_types), n)],
            "sex": pd.Categorical.from_codes(rng.integers(-1, 3, n), ["female", "male", "unknown"]),
            "batch": rng.integers(0, 40, n),
        }
    )
    start = time.perf_counter()
    specs = build_field_specs([("big.pkl", frame)], ["cell_type", "sex", "batch"])
    built = time.perf_counter()
    encoded = Vocabularies.from_specs(specs).encode(frame, source="big.pkl")
    done = time.perf_counter()
    print(f"2M rows x 3 fields: specs {built - start:.2f} s, encode {done - built:.2f} s")
    assert encoded.shape == (n, 3)
    assert specs["cell_type"].cardinality == 500
    assert sum(specs["sex"].counts.values()) + specs["sex"].n_null == n
    assert (encoded[:, 2] >= 1).all()


_SCALAR = st.one_of(
    st.none(),
    st.just(np.nan),
    _NULL_SPELLINGS,
    st.booleans(),
    st.integers(-5, 5),
    st.floats(allow_nan=False, allow_infinity=True, allow_subnormal=False, width=32),
    st.sampled_from(["3", "T cell", "Ünïcødé 细胞", "10x 3' v3"]),
    st.text(_TEXT, max_size=4),
)


def _family(value: object) -> str | None:
    """The type family of a non-null value (None for a null one), as preprocessing sees it."""
    if _is_null(value):
        return None
    for family in (bool, int, float, str):
        if isinstance(value, family):
            return family.__name__
    raise AssertionError(value)


@settings(max_examples=80, deadline=None)
@given(chunks=st.lists(st.lists(_SCALAR, min_size=1, max_size=12), min_size=1, max_size=3))
def test_mixed_types_raise_naming_file_and_field_or_round_trip_property(
    chunks: list[list[object]],
) -> None:
    frames = [
        (f"human_metadata_{i:03d}.pkl", pd.DataFrame({"batch": pd.Series(values, dtype=object)}))
        for i, values in enumerate(chunks)
    ]
    families = {_family(v) for values in chunks for v in values} - {None}
    event("mixed types" if len(families) > 1 else "one type")
    if len(families) > 1:
        with pytest.raises(MetadataError) as info:
            build_field_specs(frames, ["batch"])
        message = str(info.value)
        assert "'batch'" in message and "human_metadata_" in message
        assert "strings" in message  # what to do: convert the column to strings
        return
    spec = build_field_specs(frames, ["batch"])["batch"]
    vocab = FieldVocabulary("batch", tuple(sorted(spec.counts)))
    for source, frame in frames:
        decoded = vocab.decode(vocab.encode(frame["batch"], source=source))
        expected = [UNK if _is_null(v) else str(v) for v in frame["batch"]]
        assert decoded.tolist() == expected


_VALUE = st.text(_TEXT, min_size=1, max_size=8).filter(lambda v: not _is_null(v))


@settings(max_examples=40, deadline=None)
@given(
    fields=st.dictionaries(
        st.text(_TEXT, min_size=1, max_size=6),
        st.lists(_VALUE, min_size=2, max_size=6, unique=True),
        min_size=1,
        max_size=3,
    )
)
def test_vocabularies_and_specs_survive_their_files_property(fields: dict[str, list[str]]) -> None:
    n = max(len(values) for values in fields.values()) + 1  # every field has a null too
    columns = {field: [*values, *[None] * (n - len(values))] for field, values in fields.items()}
    frame = pd.DataFrame({field: pd.Categorical(column) for field, column in columns.items()})
    specs = build_field_specs([("m.parquet", frame)], list(fields))
    with tempfile.TemporaryDirectory() as folder:
        save_preprocessed(Path(folder), specs)
        vocabularies, loaded = load_preprocessed(Path(folder))
    assert loaded == specs
    assert vocabularies == Vocabularies.from_specs(specs)
    assert vocabularies.fields == tuple(fields)
    for field, column in columns.items():
        vocab = vocabularies.by_field[field]
        decoded = vocab.decode(vocab.encode(frame[field], source="m.parquet"))
        assert decoded.tolist() == [UNK if value is None else value for value in column]


@settings(max_examples=40, deadline=None)
@given(
    st.sampled_from(["d", "T cell", "Ünï"]),
    st.one_of(
        st.characters(codec="ascii", categories=("Cc",)).filter(lambda c: c != "\t"),
        st.characters(categories=("Cs",)),
    ),
    st.text(_TEXT, max_size=3),
)
def test_labels_with_control_characters_are_refused_naming_the_value(before, control, after):
    label = before + control + after  # a label, not a null spelling, holding the character
    column = pd.Series(["x", label, "x"], dtype=object)
    with pytest.raises(MetadataError, match=r"control character|not UTF-8") as info:
        canonical_values(column, source="m.pkl", field="donor")
    assert repr(label) in str(info.value) and "m.pkl" in str(info.value)
