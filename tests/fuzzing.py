"""What every fuzzer of hostile input shares: its example budget and the promise it checks.

The promise, for any input: the command succeeds, or it exits with status 2 and one line on stderr
that names what to fix (a served model: HTTP 400 with the reason); never a traceback, a signal
death, a half-written output or a NaN served. ``make test`` runs a short pass of every fuzzer
(``FUZZ_SHORT`` examples each unless a test asks for fewer); ``make fuzz`` runs the long pass
(``CAE_FUZZ=long``, at least ``FUZZ_LONG`` examples each) and prints hypothesis' statistics.
"""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Sequence
from pathlib import Path

from hypothesis import HealthCheck, settings

LONG = os.environ.get("CAE_FUZZ") == "long"
FUZZ_SHORT = 25
FUZZ_LONG = 2000


def fuzz_settings(short: int = FUZZ_SHORT, long: int = FUZZ_LONG) -> settings:
    """Hypothesis settings of a fuzzer: ``short`` examples in ``make test``, ``long`` in ``make
    fuzz``; no deadline (a command may take a second); fixtures shared across examples allowed
    (every example writes into its own folder)."""
    return settings(
        max_examples=long if LONG else short,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
        derandomize=not LONG,  # the short pass is the same every run; the long one explores
    )


def run_cae(argv: Sequence[str]) -> tuple[int, str]:
    """Run ``cae ARGV`` in this process; returns its exit status and stderr.

    Raises:
        AssertionError: the command broke the promise: an exit status other than 0 or 2, or a
            refusal that is not one line ``cae <command>: error: ...``. An exception other than
            the refusals propagates (a traceback a user would see).
    """
    from cae.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            status = main(list(argv))
        except SystemExit as exit:  # argparse refusing a flag: its usage, then one error line
            status = exit.code if isinstance(exit.code, int) else 1
    text = err.getvalue().strip()
    assert status in (0, 2), f"cae {' '.join(argv)} exited {status}: {text}"
    if status == 2:
        lines = [line for line in text.splitlines() if ": error: " in line]
        assert len(lines) == 1 and lines[0].startswith(f"cae {argv[0]}: error: "), text
    return status, text


def files_under(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` with its content (empty when it does not exist), to show that
    a refused command changed nothing."""
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
