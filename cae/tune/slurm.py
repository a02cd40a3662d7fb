"""SLURM scripts rendered from templates with named settings, and their submission with sbatch.

The templates live in ``experiments/slurm/`` (``tune_array.sbatch``: one Optuna worker per array
task; ``train.sbatch``: one training). Their ``$name`` placeholders are filled from
:class:`cae.config.SlurmConfig` and the study, so no script is edited by hand.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from string import Template

from cae.config import Settings
from cae.errors import ConfigError

TEMPLATES = Path(__file__).resolve().parents[2] / "experiments" / "slurm"


class SlurmError(ConfigError):
    """sbatch is missing or refused the script; the message holds its answer."""


def _resource_lines(settings: Settings) -> str:
    slurm = settings.tune.slurm
    lines = [f"#SBATCH --mem={slurm.mem}"]
    if slurm.partition:
        lines.append(f"#SBATCH --partition={slurm.partition}")
    if slurm.gpus:
        lines.append(f"#SBATCH --gpus-per-task={slurm.gpus}")
    return "\n".join(lines)


def render(template: str, settings: Settings, values: Mapping[str, str]) -> str:
    """Fill ``experiments/slurm/<template>`` with the SLURM settings and ``values``.

    Raises:
        ConfigError: the template is missing or names a placeholder nobody fills.
    """
    from cae.tracking.callbacks import tracking_uri

    path = TEMPLATES / template
    if not path.is_file():
        raise ConfigError(f"no SLURM template {path}")
    slurm = settings.tune.slurm
    uri = tracking_uri(settings.tracking.uri)
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = f"sqlite:///{Path(uri.removeprefix('sqlite:///')).resolve()}"  # tasks run elsewhere
    filled = {
        "workdir": shlex.quote(str(Path.cwd())),
        "venv": shlex.quote(str(slurm.venv.resolve())),
        "output": str(slurm.output.resolve()),
        "time": slurm.time,
        "cpus": str(slurm.cpus),
        "signal_seconds": str(slurm.signal_seconds),
        "resource_lines": _resource_lines(settings),
        "tracking_uri": shlex.quote(uri),
        **values,
    }
    try:
        return Template(path.read_text()).substitute(filled)
    except (KeyError, ValueError) as err:
        raise ConfigError(f"{path} has a placeholder with no value: {err}") from None


def submit(script: str, path: Path, sbatch_args: Sequence[str] = (), wait: bool = False) -> str:
    """Write ``script`` to ``path`` and submit it with sbatch.

    Args:
        script: the rendered script.
        path: where to keep it (beside the study's trials).
        sbatch_args: extra sbatch arguments (``--array=0-31%8``, ``--partition=gpu``, ...).
        wait: block until the job (every array task) ends (``sbatch --wait``).

    Returns:
        The job id.

    Raises:
        SlurmError: sbatch is not installed, or refused the job (its message is included).
    """
    sbatch = shutil.which("sbatch")
    if sbatch is None:
        raise SlurmError("sbatch is not on PATH; run this on a SLURM login node (or --dry-run)")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(script)
    output = re.search(r"^#SBATCH --output=(.+)/", script, re.MULTILINE)
    if output:
        Path(output.group(1)).mkdir(parents=True, exist_ok=True)  # sbatch needs it to exist
    command = [sbatch, "--parsable", *(["--wait"] if wait else []), *sbatch_args, str(path)]
    done = subprocess.run(command, capture_output=True, text=True)
    job = done.stdout.strip().split(";")[0]
    if not job.isdigit():
        raise SlurmError(f"sbatch refused {path}: {done.stderr.strip() or done.stdout.strip()}")
    if wait and done.returncode != 0:
        raise SlurmError(f"job {job} ended with a failure: {done.stderr.strip()}")
    return job
