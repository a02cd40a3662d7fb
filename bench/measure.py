"""What every benchmark shares: threads, interleaved timing, same-run limits of the machine, and the
JSON result. Machines here are shared and noisy, so cases are timed in turn, round after round, in
one process, and compared by their medians: ratios, not absolute times, are the result.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from cae.train.host import configure_host

RESULTS = Path(__file__).with_name("results")


def arguments(description: str) -> argparse.ArgumentParser:
    """A parser with the options every benchmark takes: --quick, --threads, --out."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="tiny shapes: a smoke run")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder of the JSON result")
    return parser


def setup(threads: int) -> torch.device:
    """Fix torch's threads and set the host up as training does (denormals flushed, freed memory
    kept: ``cae.train.host``), for every case alike; the device benchmarks run on."""
    configure_host(threads, keep_freed_memory=True)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def synchronize(device: torch.device) -> None:
    """Wait for queued device work (timings on an accelerator must include it)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(
    cases: Mapping[str, Callable[[], object]],
    rounds: int,
    warmup: int = 2,
    device: torch.device | None = None,
) -> dict[str, float]:
    """Median seconds per call of every case, timed in turn within each round.

    Args:
        cases: name -> a call to time.
        rounds: timed calls of each case.
        warmup: untimed calls of each case first.
        device: synchronised around every call when it is an accelerator.

    Returns:
        name -> median seconds.
    """
    times = interleaved_rounds(cases, rounds, warmup, device)
    return {name: statistics.median(values) for name, values in times.items()}


def interleaved_rounds(
    cases: Mapping[str, Callable[[], object]],
    rounds: int,
    warmup: int = 2,
    device: torch.device | None = None,
) -> dict[str, list[float]]:
    """As :func:`interleaved`, but every round's seconds: name -> one time per round, in order
    (a ratio of two cases per round shows how much the machine moved during the run)."""
    device = device or torch.device("cpu")
    for case in cases.values():
        for _ in range(warmup):
            case()
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(rounds):
        for name, case in cases.items():
            synchronize(device)
            start = time.perf_counter()
            case()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return times


def copy_case(device: torch.device, megabytes: int = 256) -> tuple[Callable[[], None], float]:
    """A copy of a buffer larger than the caches and the bytes it moves (read + write): time it
    among the other cases, and bytes / median seconds is the same-run memory bandwidth."""
    source = torch.ones(megabytes * 2**20 // 4, device=device)
    target = torch.empty_like(source)
    return (lambda: target.copy_(source)), 2.0 * source.numel() * source.element_size()


def machine() -> dict[str, Any]:
    """Where the numbers were measured."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict[str, Any] = {
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def write_result(out: Path, name: str, result: Mapping[str, Any]) -> Path:
    """Write ``result`` (plus the machine description) to ``out/name.json`` and say so."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    path.write_text(json.dumps({"machine": machine(), **result}, indent=1) + "\n")
    print(f"wrote {path}")
    return path
