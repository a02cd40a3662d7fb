"""Settings of the host that make CPU training fast, for the length of a training.

* Denormal floats flushed to zero: weights clamped at zero drift into denormal numbers, which the
  CPU handles in microcode, much slower than ordinary arithmetic (``docs/decisions.md``).
* glibc keeps freed memory: by default it returns every allocation of 32 MiB or more to the system
  when freed, so each step's large temporaries (a field's context-map gradients, the gathered maps,
  dense batches of wide gene spaces) are page-faulted in anew, which can cost more than the
  arithmetic on them. Serving them from the heap and never trimming it reuses the pages.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys
from collections.abc import Callable

import torch

log = logging.getLogger(__name__)

# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_MAX = -4


def configure_host(threads: int | None, keep_freed_memory: bool) -> Callable[[], None]:
    """Set torch's CPU threads (when given), flush denormals, and optionally keep freed memory.

    Args:
        threads: CPU threads for torch (None leaves torch's choice).
        keep_freed_memory: call :func:`keep_freed_memory_for_reuse` (process-wide, for good:
            glibc's settings are not read back).

    Returns:
        A function that puts torch's threads back and stops flushing denormals (torch's default;
        torch cannot say whether they were flushed before), for a caller that trains in a
        process that goes on to other work.
    """
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    torch.set_flush_denormal(True)
    if keep_freed_memory:
        keep_freed_memory_for_reuse()

    def restore() -> None:
        torch.set_flush_denormal(False)
        torch.set_num_threads(previous_threads)

    return restore


def keep_freed_memory_for_reuse() -> bool:
    """Ask glibc to serve all allocations from its heap and keep freed memory for reuse.

    Returns:
        Whether it took effect (False off Linux or without glibc: nothing changes).
    """
    if not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    done = (
        mallopt(_M_MMAP_MAX, 0)  # no allocation goes to its own mapping...
        and mallopt(_M_TRIM_THRESHOLD, 1 << 30)  # ...and free memory stays in the heap
        and mallopt(_M_TOP_PAD, 64 << 20)  # grow the heap in large steps
    )
    if not done:
        log.debug("mallopt refused a setting; freed memory is returned to the system as usual")
    return bool(done)
