"""Vocabularies of the categorical metadata fields the model conditions on.

Per-cell metadata arrives as one pandas DataFrame per chunk (CELLxGENE Census style: ``assay``,
``cell_type``, ``sex``, ...). For every field the model uses, preprocessing counts the values over
all chunks (:class:`FieldCounter`, :func:`build_field_specs`), decides whether the field is usable
(:class:`FieldSpec`), and freezes a vocabulary ``{value: index}`` (:class:`FieldVocabulary`,
:class:`Vocabularies`) in which index 0 is the reserved ``<unk>`` for missing values.

Missing values are NaN / None / ``pd.NA`` and any value whose ``str(value).strip().lower()`` is
one of the configured null spellings (``"unknown"``, ``"na"``, ...), plus the literal ``"<unk>"``
so that decoded values encode back to 0. Every other value is kept with its original spelling as
``str(value)``.

Everything here is vectorised: a column is factorised once (``pd.factorize``), the Python work is a
loop over its *unique* values, and the per-row result is a lookup table indexed by the codes.
"""

from __future__ import annotations

import json
import re
import reprlib
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import pandas as pd
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

from cae.data.atomic import atomic_write
from cae.errors import MetadataError, describe_invalid

UNK = "<unk>"
UNK_INDEX = 0
DEFAULT_NULL_VALUES: tuple[str, ...] = ("unknown", "na", "nan", "none", "null", "")

VOCABULARIES_FILE = "vocabularies.json"
FIELD_SPECS_FILE = "field_specs.json"

_MAX_LISTED = 20
_REDO = "Re-run preprocessing to rebuild the field specs."

# vocabularies.json: {field: {value: index}}; the indices are checked by Vocabularies.from_dict.
_VOCABULARIES_JSON = TypeAdapter(dict[str, dict[str, StrictInt]])


# --------------------------------------------------------------------------------------------------
# Canonical values of one column
# --------------------------------------------------------------------------------------------------


def _as_tuple(null_values: Iterable[str] | str) -> tuple[str, ...]:
    """The null spellings as a tuple; a single string is one spelling, not its characters."""
    return (null_values,) if isinstance(null_values, str) else tuple(null_values)


def _null_set(null_values: Iterable[str] | str) -> frozenset[str]:
    """Normalised null spellings (stripped, lower case), always including ``<unk>``."""
    return frozenset(str(v).strip().lower() for v in _as_tuple(null_values)) | {UNK}


def _family_of_type(kind: type) -> str:
    """The type family of a value type: numpy scalars count as their Python counterpart."""
    if issubclass(kind, (bool, np.bool_)):
        return "bool"
    if issubclass(kind, (int, np.integer)):
        return "int"
    if issubclass(kind, (float, np.floating)):
        return "float"
    if issubclass(kind, str):  # np.str_ is a subclass of str
        return "str"
    return kind.__name__


def _mixed_types_error(source: str, field: str, first: Any, second: Any) -> MetadataError:
    return MetadataError(
        f"{source}: field {field!r} mixes value types, e.g. {_describe(first)} and "
        f"{_describe(second)}. Convert the column to strings before preprocessing, e.g. "
        f"frame[{field!r}] = frame[{field!r}].astype(str), or give every value one type."
    )


# Characters no label may hold: C0 controls but the tab, and DEL (a "\r" in a label split the rows
# of contributions.csv).
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")

# infer_dtype kinds in which every non-missing value has one type family.
_SINGLE_FAMILY_KINDS = frozenset({"string", "integer", "floating", "boolean", "empty"})


def _check_object_families(
    column: pd.Series, known: np.ndarray, *, source: str, field: str
) -> None:
    """Raise if the non-null cells of an object column hold values of different type families.

    ``pd.factorize`` merges equal values of different types (``True`` and ``1``, ``1`` and
    ``1.0``), so the per-unique check can miss them. ``infer_dtype`` (Cython) clears the common
    single-type columns; otherwise the types of the non-null cells are factorised.
    """
    if pd.api.types.infer_dtype(column, skipna=True) in _SINGLE_FAMILY_KINDS:
        return
    values = column.to_numpy(dtype=object)[known]
    type_codes, types = pd.factorize(pd.Series(values, dtype=object).map(type))
    families = [_family_of_type(kind) for kind in types]
    for k, family in enumerate(families):
        if family != families[0]:
            first = values[int(np.argmax(type_codes == 0))]
            second = values[int(np.argmax(type_codes == k))]
            raise _mixed_types_error(source, field, first, second)


def _is_scalar_na(value: Any) -> bool:
    try:
        return bool(pd.isna(value))
    except (TypeError, ValueError):  # pd.isna of an array-like value
        return False


def _describe(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def _quote_list(values: Sequence[str], limit: int = _MAX_LISTED) -> str:
    shown = ", ".join(repr(v) for v in values[:limit])
    if len(values) > limit:
        shown += f", ... and {len(values) - limit:,} more"
    return shown or "(none)"


@dataclass
class _Canonical:
    codes: np.ndarray  # int64, -1 for null
    uniques: list[str]
    family: str | None  # type family of the non-null values; None when all are null
    example: Any  # one non-null original value, for messages


def _factorise(column: pd.Series, *, source: str, field: str) -> tuple[np.ndarray, pd.Index]:
    """Int64 codes (-1 for NaN) and uniques of a column; refuses non-Series, unhashable cells."""
    if not isinstance(column, pd.Series):
        raise MetadataError(
            f"{source}: field {field!r} is a {type(column).__name__}, not a single column "
            "(is the column name repeated in the file?). Give every metadata column a unique name."
        )
    try:
        raw_codes, raw_uniques = pd.factorize(column, use_na_sentinel=True)
    except TypeError:  # unhashable cells (lists, dicts, arrays) cannot be labels
        unhashable = next((v for v in column if not isinstance(v, Hashable)), None)
        raise MetadataError(
            f"{source}: field {field!r} holds {type(unhashable).__name__} values (e.g. "
            f"{reprlib.repr(unhashable)}), not labels; a field holds one label per cell (text, a "
            f"number or a bool): convert the column, e.g. frame[{field!r}] = "
            f"frame[{field!r}].astype(str), or drop {field} from data.fields"
        ) from None
    return np.asarray(raw_codes, dtype=np.int64), raw_uniques


def _check_label(text: str, *, source: str, field: str) -> None:
    """Raise if a label is not UTF-8 text or holds a control character."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise MetadataError(
            f"{source}: field {field!r} holds the value {text!r}, which is not UTF-8 text (a "
            "lone surrogate); read the file with the right encoding and write it again"
        ) from None
    if _CONTROL.search(text):
        raise MetadataError(
            f"{source}: field {field!r} holds the value {text!r}, with a control character "
            "(a line break, NUL...); a label is one line of text that tables and MLflow can "
            "hold: remove line breaks and other control characters from the column and write "
            "the file again"
        )


def _canonicalise(
    column: pd.Series, null_values: Iterable[str] | str, *, source: str, field: str
) -> _Canonical:
    """The canonical values of one column (see :func:`canonical_values`) with their type family."""
    nulls = _null_set(null_values)
    raw_codes, raw_uniques = _factorise(column, source=source, field=field)

    # Python work happens per unique value only; the rows are remapped with one lookup table whose
    # last entry (-1) is what the null code -1 indexes.
    remap = np.full(len(raw_uniques) + 1, -1, dtype=np.int64)
    uniques: list[str] = []
    position: dict[str, int] = {}
    family: str | None = None
    example: Any = None
    for i, value in enumerate(raw_uniques):
        if value is None or _is_scalar_na(value):
            continue
        text = str(value)
        if text.strip().lower() in nulls:
            continue
        _check_label(text, source=source, field=field)
        value_family = _family_of_type(type(value))
        if family is None:
            family, example = value_family, value
        elif value_family != family:
            raise _mixed_types_error(source, field, example, value)
        index = position.get(text)
        if index is None:
            index = position[text] = len(uniques)
            uniques.append(text)
        remap[i] = index
    codes = remap[raw_codes]
    if family is not None and column.dtype == object:
        _check_object_families(column, codes >= 0, source=source, field=field)
    return _Canonical(codes, uniques, family, example)


def canonical_values(
    column: pd.Series, null_values: Iterable[str] = DEFAULT_NULL_VALUES, *, source: str, field: str
) -> tuple[np.ndarray, list[str]]:
    """Factorise a metadata column into codes over its canonical (string) values.

    Args:
        column: one metadata column (object, str, categorical or numeric dtype).
        null_values: spellings that mean "missing", compared case-insensitively after stripping
            surrounding whitespace. NaN / None / ``pd.NA`` and ``"<unk>"`` are always null.
        source: the file the column comes from, for error messages.
        field: the column's name, for error messages.

    Returns:
        ``(codes, uniques)``: ``codes`` is an int64 array of ``len(column)`` indexing into
        ``uniques`` (-1 for null cells); ``uniques`` lists each non-null value once, as
        ``str(value)`` with its original spelling, in order of first appearance.

    Raises:
        MetadataError: the non-null values have different types (e.g. ``3`` and ``"3"``), or
            ``column`` is not a Series.
    """
    canonical = _canonicalise(column, null_values, source=source, field=field)
    return canonical.codes, canonical.uniques


# --------------------------------------------------------------------------------------------------
# Field statistics
# --------------------------------------------------------------------------------------------------


class FieldSpec(BaseModel):
    """What preprocessing learnt about one metadata field, and whether the model uses it.

    Read back from ``field_specs.json`` and checkpoints with :meth:`from_dict`; a ``kind`` key in
    older files is ignored.

    Attributes:
        field: the column name.
        cardinality: the number of known (non-null) values, excluding ``<unk>``.
        n_cells: cells seen.
        n_null: cells whose value is null.
        non_null_fraction: ``(n_cells - n_null) / n_cells`` (0.0 when no cells were seen).
        using: whether the model conditions on this field.
        reason: why the field is not used (None when it is).
        counts: known value -> number of cells, sorted by value.
    """

    model_config = ConfigDict(strict=True, extra="ignore")

    field: str = Field(min_length=1)
    cardinality: int = Field(ge=0)
    n_cells: int = Field(ge=0)
    n_null: int = Field(ge=0)
    non_null_fraction: float
    using: bool
    reason: str | None = None
    counts: dict[str, Annotated[int, Field(ge=0)]]

    @field_validator("counts")
    @classmethod
    def _sorted(cls, counts: dict[str, int]) -> dict[str, int]:
        return dict(sorted(counts.items()))

    @model_validator(mode="after")
    def _counts_add_up(self) -> FieldSpec:
        if self.cardinality != len(self.counts):
            raise ValueError(
                f"cardinality {self.cardinality} differs from the {len(self.counts)} counted values"
            )
        if self.n_null > self.n_cells or sum(self.counts.values()) != self.n_cells - self.n_null:
            raise ValueError(
                f"counts sum to {sum(self.counts.values()):,} but n_cells - n_null is "
                f"{self.n_cells - self.n_null:,}"
            )
        return self

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict; :meth:`from_dict` reads it back."""
        return self.model_dump()

    @classmethod
    def from_dict(cls, d: Any) -> FieldSpec:
        """Rebuild a spec from :meth:`to_dict` output.

        Raises:
            MetadataError: a key is missing or a value has the wrong type or is inconsistent.
        """
        try:
            return cls.model_validate(d)
        except ValidationError as err:
            where = f"field spec {d.get('field')!r}" if isinstance(d, Mapping) else "field spec"
            raise MetadataError(f"{where}: {describe_invalid(err)}. {_REDO}") from None


# field_specs.json: every spec, in the order of the requested fields.
_FIELD_SPECS_JSON = TypeAdapter(list[FieldSpec])


class FieldCounter:
    """Counts one field's values over a stream of metadata chunks.

    Call :meth:`update` once per chunk, then :meth:`finish` for the :class:`FieldSpec`. The Python
    type of the field's values must stay the same across chunks.
    """

    def __init__(self, field: str, null_values: Iterable[str] = DEFAULT_NULL_VALUES) -> None:
        """Start counting ``field``; ``null_values`` are the spellings that mean missing."""
        self.field = field
        self.null_values = _as_tuple(null_values)
        self.n_cells = 0
        self.n_null = 0
        self.counts: dict[str, int] = {}
        self._family: str | None = None
        self._family_source: str | None = None
        self._family_example: Any = None

    def update(self, column: pd.Series, *, source: str) -> None:
        """Add one chunk's column, read from the file ``source``.

        Raises:
            MetadataError: the column mixes value types, or its values have a different type than
                in an earlier chunk.
        """
        canonical = _canonicalise(column, self.null_values, source=source, field=self.field)
        if canonical.family is not None:
            if self._family is None:
                self._family = canonical.family
                self._family_source = source
                self._family_example = canonical.example
            elif canonical.family != self._family:
                hint = ""
                if {canonical.family, self._family} == {"int", "float"}:
                    hint = (
                        " (integer columns with missing values are read as floats; store the "
                        "column as strings or with pandas' nullable 'Int64' dtype)"
                    )
                raise MetadataError(
                    f"field {self.field!r} holds {self._family} values in {self._family_source} "
                    f"(e.g. {self._family_example!r}) but {canonical.family} values in {source} "
                    f"(e.g. {canonical.example!r}){hint}. Give the column the same type in every "
                    "metadata file, e.g. convert it to strings."
                )
        codes = canonical.codes
        known = codes[codes >= 0]
        per_value = np.bincount(known, minlength=len(canonical.uniques))
        for value, count in zip(canonical.uniques, per_value.tolist(), strict=True):
            self.counts[value] = self.counts.get(value, 0) + count
        self.n_cells += len(codes)
        self.n_null += len(codes) - len(known)

    def finish(self) -> FieldSpec:
        """The spec of everything counted so far; ``using`` is False with a reason when the field
        has fewer than two known values. Does not reset the counter."""
        cardinality = len(self.counts)
        reason: str | None = None
        if self.n_cells == 0:
            reason = "no cells were read"
        elif cardinality == 0:
            reason = f"every value is null ({self.n_cells:,} cells)"
        elif cardinality == 1:
            (only,) = self.counts
            reason = f"only one known value ('{only}') in {self.n_cells:,} cells"
        return FieldSpec(
            field=self.field,
            cardinality=cardinality,
            n_cells=self.n_cells,
            n_null=self.n_null,
            non_null_fraction=(self.n_cells - self.n_null) / self.n_cells if self.n_cells else 0.0,
            counts=self.counts,
            using=reason is None,
            reason=reason,
        )


def _column(frame: pd.DataFrame, field: str, *, source: str) -> pd.Series:
    """``frame[field]``, or a MetadataError naming the file, the field and the columns it has."""
    if field not in frame.columns:
        columns = [str(c) for c in frame.columns]
        raise MetadataError(
            f"{source}: metadata has no field {field!r}. Its columns are: "
            f"{_quote_list(columns)}. Fix the field name in the settings or add the column."
        )
    return frame[field]


def build_field_specs(
    frames: Iterable[tuple[str, pd.DataFrame]],
    fields: Sequence[str],
    null_values: Iterable[str] = DEFAULT_NULL_VALUES,
) -> dict[str, FieldSpec]:
    """Count the requested fields over all metadata chunks.

    Args:
        frames: ``(source name, DataFrame)`` per chunk; only the columns in ``fields`` are read.
        fields: the metadata fields to count.
        null_values: spellings that mean missing (see :func:`canonical_values`).

    Returns:
        ``{field: FieldSpec}`` in the order of ``fields``.

    Raises:
        MetadataError: ``fields`` is empty or repeats a field; a frame lacks a field; a field mixes
            value types within a chunk or between chunks.
    """
    if isinstance(fields, str):
        fields = [fields]
    fields = list(fields)
    if not fields:
        raise MetadataError(
            "No metadata fields were requested. List the categorical fields to condition on "
            "(e.g. cell_type, sex, assay) in the data settings."
        )
    repeated = sorted({f for f in fields if fields.count(f) > 1})
    if repeated:
        raise MetadataError(
            f"Metadata fields are listed more than once: {_quote_list(repeated)}. "
            "List each field once."
        )
    null_values = _as_tuple(null_values)
    counters = {field: FieldCounter(field, null_values) for field in fields}
    for source, frame in frames:
        columns = [_column(frame, field, source=source) for field in fields]
        for field, column in zip(fields, columns, strict=True):
            counters[field].update(column, source=source)
    return {field: counter.finish() for field, counter in counters.items()}


def require_usable(specs: Mapping[str, FieldSpec], source: str) -> None:
    """Check that every requested field can condition the model (training asks for this; the
    ``cae preprocess`` report only marks such fields as skipped).

    Args:
        specs: the specs of the requested fields.
        source: the data set they were counted in, for the message.

    Raises:
        MetadataError: a field has fewer than two known values (all null, or one value); the
            message names each such field, why, and the fields left to train on.
    """
    unusable = [spec for spec in specs.values() if not spec.using]
    if not unusable:
        return
    reasons = "; ".join(f"field {spec.field!r}: {spec.reason}" for spec in unusable)
    usable = [spec.field for spec in specs.values() if spec.using]
    names = ", ".join(spec.field for spec in unusable)
    remedy = (
        f"drop {names} from data.fields (--fields {','.join(usable)})"
        if usable
        else "choose other fields in data.fields (--fields)"
    )
    raise MetadataError(
        f"{source}: {reasons}. A field needs at least two known values to condition the model: "
        f"{remedy}, or fix its values (`cae preprocess` reports every field)."
    )


# --------------------------------------------------------------------------------------------------
# Vocabularies
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FieldVocabulary:
    """The vocabulary of one field: ``<unk>`` is index 0 and ``values[i]`` is index ``i + 1``.

    :meth:`Vocabularies.from_specs` builds vocabularies with sorted values; one read back with
    :meth:`Vocabularies.from_dict` keeps the indices of the file.
    """

    field: str
    values: tuple[str, ...]

    def __post_init__(self) -> None:
        values = tuple(self.values)
        object.__setattr__(self, "values", values)
        where = f"vocabulary of field {self.field!r}"
        bad = [v for v in values if not isinstance(v, str)]
        if bad:
            raise MetadataError(f"{where}: values must be strings, got {_quote_list(bad)}.")
        if UNK in values:
            raise MetadataError(f"{where}: {UNK!r} is reserved for index {UNK_INDEX}.")
        if len(set(values)) != len(values):
            raise MetadataError(f"{where}: values are not unique.")

    @property
    def size(self) -> int:
        """The number of indices, ``<unk>`` included."""
        return len(self.values) + 1

    def index_of(self) -> dict[str, int]:
        """``{"<unk>": 0, value: index}``."""
        return {UNK: UNK_INDEX, **{v: i + 1 for i, v in enumerate(self.values)}}

    def _lookup(self) -> dict[str, int]:
        cached = self.__dict__.get("_index_cache")
        if cached is None:
            cached = {v: i + 1 for i, v in enumerate(self.values)}
            object.__setattr__(self, "_index_cache", cached)
        return cached

    def encode(
        self, column: pd.Series, null_values: Iterable[str] = DEFAULT_NULL_VALUES, *, source: str
    ) -> np.ndarray:
        """Indices of a column's values.

        Args:
            column: the field's column from one metadata chunk.
            null_values: spellings that mean missing; null cells get index 0 (``<unk>``).
            source: the file the column comes from, for error messages.

        Returns:
            An int64 array of ``len(column)``.

        Raises:
            MetadataError: a value is not in the vocabulary, or the column mixes value types.
        """
        codes, uniques = canonical_values(column, null_values, source=source, field=self.field)
        lookup = self._lookup()
        table = np.zeros(len(uniques) + 1, dtype=np.int64)  # last entry: the null code -1
        unseen = []
        for i, value in enumerate(uniques):
            index = lookup.get(value)
            if index is None:
                unseen.append(value)
            else:
                table[i] = index
        if unseen:
            raise MetadataError(
                f"{source}: field {self.field!r} has {len(unseen):,} value(s) the vocabulary does "
                f"not know: {_quote_list(unseen, 5)}. Known values ({len(self.values):,}): "
                f"{_quote_list(self.values)}. The vocabulary was built from other metadata; "
                "rebuild it including this file, or map these values to known ones or to a null "
                "spelling so they encode as <unk>."
            )
        return table[codes]

    def encode_values(
        self,
        values: Sequence[str],
        null_values: Iterable[str] = DEFAULT_NULL_VALUES,
        *,
        source: str,
    ) -> np.ndarray:
        """:meth:`encode` for a list of values (``"<unk>"`` and null spellings give 0)."""
        if isinstance(values, str):
            values = [values]
        column = pd.Series(list(values), dtype=object)
        return self.encode(column, null_values, source=source)

    def decode(self, indices: np.ndarray) -> np.ndarray:
        """The values of ``indices`` (any shape) as an object array of str; 0 gives ``"<unk>"``.

        Raises:
            MetadataError: ``indices`` are not integers or lie outside ``0 .. size - 1``.
        """
        indices = np.asarray(indices)
        if indices.size and not np.issubdtype(indices.dtype, np.integer):
            raise MetadataError(
                f"field {self.field!r}: cannot decode indices of dtype {indices.dtype}; "
                "expected integers."
            )
        if indices.size and (indices.min() < 0 or indices.max() >= self.size):
            raise MetadataError(
                f"field {self.field!r}: indices must lie in 0..{self.size - 1}, got "
                f"{int(indices.min())}..{int(indices.max())}. Were they produced with another "
                "vocabulary?"
            )
        table = np.array([UNK, *self.values], dtype=object)
        return table[indices.astype(np.int64, copy=False)]


@dataclass(frozen=True)
class Vocabularies:
    """The ordered fields the model conditions on and their vocabularies (in every checkpoint)."""

    fields: tuple[str, ...]
    by_field: dict[str, FieldVocabulary]

    def __post_init__(self) -> None:
        object.__setattr__(self, "fields", tuple(self.fields))
        if not self.fields:
            raise MetadataError("Vocabularies need at least one field.")
        if len(set(self.fields)) != len(self.fields):
            raise MetadataError(f"Vocabularies list a field twice: {self.fields!r}.")
        if set(self.by_field) != set(self.fields):
            raise MetadataError(
                f"Vocabularies: fields {self.fields!r} do not match the vocabularies of "
                f"{tuple(self.by_field)!r}."
            )
        object.__setattr__(self, "by_field", {f: self.by_field[f] for f in self.fields})
        for field, vocabulary in self.by_field.items():
            if vocabulary.field != field:
                raise MetadataError(
                    f"Vocabularies: the entry for {field!r} is the vocabulary of "
                    f"{vocabulary.field!r}."
                )

    @classmethod
    def from_specs(cls, specs: Mapping[str, FieldSpec]) -> Vocabularies:
        """Vocabularies (sorted values) of the specs with ``using=True``, in the specs' order.

        Raises:
            MetadataError: no spec is usable (the message gives each field's reason).
        """
        by_field: dict[str, FieldVocabulary] = {}
        for key, spec in specs.items():
            if key != spec.field:
                raise MetadataError(f"Field specs: the entry {key!r} describes {spec.field!r}.")
            if spec.using:
                by_field[spec.field] = FieldVocabulary(spec.field, tuple(sorted(spec.counts)))
        if not by_field:
            reasons = "; ".join(f"{s.field!r}: {s.reason or 'not used'}" for s in specs.values())
            raise MetadataError(
                "None of the metadata fields can be used for conditioning ("
                f"{reasons or 'no fields given'}). Choose fields with at least two known values."
            )
        return cls(tuple(by_field), by_field)

    def encode(
        self,
        frame: pd.DataFrame,
        null_values: Iterable[str] = DEFAULT_NULL_VALUES,
        *,
        source: str,
    ) -> np.ndarray:
        """Encode every field of a metadata chunk.

        Returns:
            An int64 array ``(n_cells, n_fields)`` with columns in the order of :attr:`fields`.

        Raises:
            MetadataError: a field is missing from ``frame`` or holds an unknown value.
        """
        columns = [_column(frame, field, source=source) for field in self.fields]
        out = np.empty((len(frame), len(self.fields)), dtype=np.int64)
        for j, (field, column) in enumerate(zip(self.fields, columns, strict=True)):
            out[:, j] = self.by_field[field].encode(column, null_values, source=source)
        return out

    def sizes(self) -> dict[str, int]:
        """``{field: vocabulary size including <unk>}``."""
        return {field: self.by_field[field].size for field in self.fields}

    def to_dict(self) -> dict[str, dict[str, int]]:
        """``{field: {value: index}}`` including ``"<unk>": 0`` (the vocabularies.json format)."""
        return {field: self.by_field[field].index_of() for field in self.fields}

    @classmethod
    def from_dict(cls, d: Any, *, source: str = VOCABULARIES_FILE) -> Vocabularies:
        """Read :meth:`to_dict` output back, keeping its indices.

        Raises:
            MetadataError (naming ``source``): not a non-empty ``{field: {value: index}}`` with
                integer indices, ``"<unk>"`` is not 0, or the other indices are not ``1..K``.
        """
        redo = "Re-run preprocessing to rebuild it."
        try:
            d = _VOCABULARIES_JSON.validate_python(d)
        except ValidationError as err:
            raise MetadataError(
                f"{source}: expected {{field: {{value: index}}}}: {describe_invalid(err)}. {redo}"
            ) from None
        if not d:
            raise MetadataError(f"{source}: expected a non-empty JSON object of fields. {redo}")
        by_field: dict[str, FieldVocabulary] = {}
        for field, mapping in d.items():
            where = f"{source}: field {field!r}"
            if mapping.get(UNK) != UNK_INDEX:
                raise MetadataError(
                    f"{where}: {UNK!r} must have index {UNK_INDEX}, got {mapping.get(UNK)!r}. "
                    + redo
                )
            items = [(v, i) for v, i in mapping.items() if v != UNK]
            items.sort(key=lambda item: item[1])
            if [i for _, i in items] != list(range(1, len(items) + 1)):
                raise MetadataError(
                    f"{where}: the indices of the known values must be 1..{len(items)} without "
                    f"gaps or repeats, got {sorted(i for _, i in items)[:_MAX_LISTED]!r}. {redo}"
                )
            by_field[field] = FieldVocabulary(field, tuple(v for v, _ in items))
        return cls(tuple(by_field), by_field)


# --------------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------------


def _write_json_atomic(path: Path, payload: Any) -> None:
    text = json.dumps(payload, indent=2, ensure_ascii=False) + "\n"
    with atomic_write(path) as handle:
        handle.write(text.encode("utf-8"))


def save_preprocessed(out_dir: Path, specs: Mapping[str, FieldSpec]) -> tuple[Path, Path]:
    """Write ``vocabularies.json`` (used fields) and ``field_specs.json`` (every spec).

    Each file is written to a temporary file in ``out_dir`` and renamed into place, so a reader
    never sees a half-written file. ``out_dir`` is created if needed.

    Returns:
        ``(vocabularies path, field specs path)``.

    Raises:
        MetadataError: no field is usable (nothing is written then).
    """
    vocabularies = Vocabularies.from_specs(specs)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    vocab_path = out_dir / VOCABULARIES_FILE
    specs_path = out_dir / FIELD_SPECS_FILE
    _write_json_atomic(specs_path, [spec.to_dict() for spec in specs.values()])
    _write_json_atomic(vocab_path, vocabularies.to_dict())
    return vocab_path, specs_path


def _read_json(path: Path) -> Any:
    redo = "Re-run preprocessing to create it."
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise MetadataError(f"{path}: file not found. {redo}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise MetadataError(f"{path}: cannot be read ({exc}). {redo}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise MetadataError(f"{path}: is not valid JSON ({exc}). {redo}") from None


def load_preprocessed(dir: Path) -> tuple[Vocabularies, dict[str, FieldSpec]]:
    """Read what :func:`save_preprocessed` wrote in ``dir``.

    Returns:
        ``(vocabularies, {field: FieldSpec})``, specs in file order.

    Raises:
        MetadataError: a file is missing, corrupt, or the two files disagree (the message names
            the file).
    """
    directory = Path(dir)
    vocab_path = directory / VOCABULARIES_FILE
    specs_path = directory / FIELD_SPECS_FILE
    vocabularies = Vocabularies.from_dict(_read_json(vocab_path), source=str(vocab_path))

    try:
        listed = _FIELD_SPECS_JSON.validate_python(_read_json(specs_path))
    except ValidationError as err:
        raise MetadataError(
            f"{specs_path}: expected a JSON list of field specs: {describe_invalid(err)}. {_REDO}"
        ) from None
    specs: dict[str, FieldSpec] = {}
    for spec in listed:
        if spec.field in specs:
            raise MetadataError(
                f"{specs_path}: field {spec.field!r} appears twice. Re-run preprocessing."
            )
        specs[spec.field] = spec

    used = [spec.field for spec in specs.values() if spec.using]
    mismatch = list(vocabularies.fields) != used or any(
        set(vocabularies.by_field[f].values) != set(specs[f].counts) for f in used
    )
    if mismatch:
        raise MetadataError(
            f"{vocab_path} and {specs_path} disagree about the fields or their values (were they "
            "written by different runs?). Re-run preprocessing to rebuild both."
        )
    return vocabularies, specs
