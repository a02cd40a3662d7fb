"""Contexts written as ``field=value`` text, and the cells they select.

A selection, ``"cell_type=B,condition=stimulated"``, names the cells of one combination: it keeps
a combination out of training (``data.exclude``) and names the evaluation protocol's held-out,
source and target cells. Counterfactual targets, ``"sex=female;assay=10x 3' v3"``, name the
context cells are moved to (``cae generate --set``, the registered model's ``targets``).

Values compare as text (``str(value)``), so a selection written on the command line matches
integer or categorical columns too.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from cae.errors import ConfigError


def parse_field_values(
    text: str, separator: str, *, what: str, hint: str, skip_empty: bool = False
) -> dict[str, str]:
    """Parse ``field=value`` parts joined by ``separator`` into ``{field: value}``.

    The one parser of ``field=value`` text: selections (``data.exclude``, ``--holdout``) and
    counterfactual targets (``--set``, the served model's ``targets``) both go through it.

    Args:
        text: the parts; spaces around names and values are dropped.
        separator: what joins the parts (``","`` or ``";"``).
        what: what the text is, for error messages (e.g. ``"--holdout"``, ``"target"``).
        hint: how to write it, ending the message about a malformed part.
        skip_empty: drop empty parts (so ``""`` gives ``{}``) instead of refusing them.

    Returns:
        ``{field: value}`` in the order written.

    Raises:
        ConfigError: a part without ``=`` or with an empty name or value (the message names the
            part, and the whole text when it has other parts), or a field named twice.
    """
    pairs: dict[str, str] = {}
    for raw in str(text).split(separator):
        part = raw.strip()
        if skip_empty and not part:
            continue
        name, sep, value = part.partition("=")
        name, value = name.strip(), value.strip()
        if not sep or not name or not value:
            within = f" (in {text!r})" if part != text else ""
            raise ConfigError(f"{what} {part!r} is not field=value{within}; {hint}")
        if name in pairs:
            raise ConfigError(f"{what} {text!r} names field '{name}' twice")
        pairs[name] = value
    return pairs


def parse_targets(text: str) -> dict[str, str]:
    """Parse counterfactual targets, ``"sex=female;assay=10x 3' v3"``, into ``{field: value}``.

    Empty parts are skipped, so ``""`` gives ``{}`` (the cells reconstructed).

    Raises:
        ConfigError: a part is not ``field=value``, or names a field twice.
    """
    hint = 'write targets as "sex=female;assay=10x 3\' v3"'
    return parse_field_values(text, ";", what="target", hint=hint, skip_empty=True)


@dataclass(frozen=True)
class Selection:
    """Cells whose metadata has every ``field=value`` of :attr:`values` (an AND of equalities).

    Build one with :meth:`parse` (``"cell_type=B,condition=stimulated"``) or from a mapping.
    """

    values: tuple[tuple[str, str], ...]

    @classmethod
    def parse(cls, text: str, what: str = "selection") -> Selection:
        """Parse ``"field=value,field=value"`` (see :func:`parse_field_values`).

        Args:
            text: the selection; spaces around names and values are dropped.
            what: what the text is, for error messages (e.g. ``"--holdout"``).

        Returns:
            The selection.

        Raises:
            ConfigError: empty, a part without ``=``, an empty name or value, or a field twice.
        """
        hint = "each part must be field=value, e.g. 'cell_type=B,condition=stimulated'"
        return cls(tuple(parse_field_values(text, ",", what=what, hint=hint).items()))

    @classmethod
    def of(cls, values: Mapping[str, str]) -> Selection:
        """The selection of a ``{field: value}`` mapping."""
        return cls(tuple((str(k), str(v)) for k, v in values.items()))

    @property
    def fields(self) -> list[str]:
        """The fields the selection looks at, in order."""
        return [name for name, _ in self.values]

    def as_dict(self) -> dict[str, str]:
        """``{field: value}``."""
        return dict(self.values)

    def replace(self, values: Mapping[str, str]) -> Selection:
        """This selection with some fields set to other values (fields not here are added)."""
        return Selection.of({**self.as_dict(), **values})

    def mask(self, frame: pd.DataFrame) -> np.ndarray:
        """Boolean (n_rows,) array: which rows of ``frame`` are selected.

        Raises:
            ConfigError: the frame lacks one of the selection's fields.
        """
        selected = np.ones(len(frame), dtype=bool)
        for name, value in self.values:
            if name not in frame.columns:
                raise ConfigError(
                    f"selection {self} needs metadata field '{name}', which the data lacks; "
                    f"its columns are: {', '.join(map(str, frame.columns))}"
                )
            selected &= frame[name].astype(str).to_numpy() == value
        return selected

    def __str__(self) -> str:
        return ",".join(f"{name}={value}" for name, value in self.values)


def any_selected(frame: pd.DataFrame, selections: Sequence[Selection]) -> np.ndarray:
    """Boolean (n_rows,) array: rows matching at least one of ``selections``."""
    hit = np.zeros(len(frame), dtype=bool)
    for selection in selections:
        hit |= selection.mask(frame)
    return hit


def selection_fields(selections: Sequence[Selection]) -> list[str]:
    """Every field the selections look at, each once, in first-seen order."""
    return list(dict.fromkeys(name for selection in selections for name in selection.fields))
