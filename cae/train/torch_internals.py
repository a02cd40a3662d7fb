"""The one module that uses torch internals (private APIs), each opt-in: ``train.torch_internals``.

Every default path of the project uses public torch APIs; what is here saves a copy the public API
makes, and is tested against the public path (``tests/test_optim.py``) on both ends of the
supported torch range (``make test-torch``). A torch release may change what it relies on: turn
the setting off if a new torch fails those tests.

* :func:`sparse_rows`: a sparse COO gradient's rows and values, read without coalescing it.
  Autograd drops the coalesced flag of the context maps' gradient when it accumulates it into
  ``.grad``, so the public ``values()`` needs ``coalesce()``, a copy of every touched row.
"""

from __future__ import annotations

import torch


def sparse_rows(grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The first-dimension rows and the values of a sparse COO tensor, without copying them.

    Args:
        grad: a sparse COO tensor, coalesced or not.

    Returns:
        ``(rows, values)`` when its rows are sorted and distinct (what a context-map pass gives);
        None otherwise (the caller coalesces).
    """
    rows, values = grad._indices()[0], grad._values()
    if rows.numel() <= 1 or bool((rows[1:] > rows[:-1]).all()):
        return rows, values
    return None
