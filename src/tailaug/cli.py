"""The ``tailaug`` command."""

from __future__ import annotations

import argparse
import os
import sys
from importlib import metadata
from pathlib import Path

from .engine.threads import set_passive_wait
from .errors import TailaugError

DESCRIPTION = """\
tailaug trains and evaluates long-tailed image classifiers: stage 1 trains a backbone on a
long-tailed dataset, stage 2 learns a semantic transformation generator from head-class
features, and stage 3 re-trains the classifier on cached features with tail samples
augmented in feature space. Commands take a YAML config (with key=value overrides after it)
or a run directory that an earlier command wrote.
"""

USAGE_EXAMPLES = """examples:
  tailaug train configs/fmnist_lt/ce.yaml train.epochs=5 data.imbalance_factor=50
  tailaug train configs/fmnist_lt/ce.yaml --resume
  tailaug evaluate runs/fmnist_lt_ce
  tailaug run configs/fmnist_lt/mixup.yaml --seeds 0 1 2
  tailaug report "runs/fmnist_lt_*-s*" --out reports/fmnist
  tailaug analyze figures runs/fmnist_lt_mixup-s0
  tailaug datasets describe configs/cifar10_lt/if100.yaml
  tailaug predict runs/my_images photos/ --top-k 3 --out predictions.csv
  tailaug predict runs/embeddings_example data/embeddings/test.npz --out predictions.csv
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tailaug", description=DESCRIPTION, epilog=USAGE_EXAMPLES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    def with_config(p):
        p.add_argument("config", help="YAML config file")
        p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.epochs=5")
        p.add_argument("--no-progress", action="store_true", help="no progress bars")
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
        return p

    train = with_config(sub.add_parser("train", help="stage 1: train backbone and classifier"))
    train.add_argument("--resume", action="store_true", help="continue from the run's last checkpoint")

    run = with_config(sub.add_parser("run", help="all three stages, reusing finished ones"))
    run.add_argument("--resume", action="store_true",
                     help="continue an existing run only (a stopped stage 1 is continued without it too; "
                          "with it a run.name that holds no run of this config is an error)")
    run.add_argument("--seeds", nargs="+", metavar="SEED",
                     help="one run per seed (run.seed=SEED, run.name suffixed -sSEED), then their report")
    run.add_argument("--out", help="with --seeds: the report directory (default RUN_OUTPUT_DIR/NAME-report)")

    rep = sub.add_parser("report", help="mean and std over seeds of several runs: Markdown, CSV, JSON, figure")
    rep.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories; globs are expanded")
    rep.add_argument("--out", help="the report directory (default: report beside the runs)")
    rep.add_argument("--debug", action="store_true", default=argparse.SUPPRESS)

    ev = sub.add_parser("evaluate", help="evaluate a run directory's last checkpoint on the test set")
    ev.add_argument("run_dir")
    ev.add_argument("overrides", nargs="*", help="e.g. eval.logit_adjust_tau=1.0")
    ev.add_argument("--debug", action="store_true", default=argparse.SUPPRESS)

    ds = sub.add_parser("datasets", help="dataset tools")
    ds_sub = ds.add_subparsers(dest="action", required=True)
    with_config(ds_sub.add_parser("describe", help="per-class counts, shot groups and totals"))

    em = with_config(sub.add_parser("embed", help="features of a pretrained backbone for the train/val/test "
                                                  "splits, as .npz (features, labels, class_names)"))
    em.add_argument("--out", required=True, help="FILE.npz for the training split; FILE_val.npz, FILE_test.npz beside it")

    pr = sub.add_parser("predict", help="classify image files or folders (an embeddings run: every row of feature "
                                        "files) with a finished run; writes a CSV")
    pr.add_argument("run_dir")
    pr.add_argument("inputs", nargs="+", help="image files or folders of images; for a run of data.dataset "
                                              "embeddings, .npz/.npy/.parquet/.safetensors files of features")
    pr.add_argument("--classifier", default="final", choices=("final", "crt", "augmented", "stage1"),
                    help="final (default): stage 3 with the augmenter if the run has one, else stage 3 "
                         "without, else stage 1")
    pr.add_argument("--top-k", type=int, default=5, help="classes listed per input (default 5)")
    pr.add_argument("--out", help="CSV file to write (default: standard output)")
    pr.add_argument("--batch-size", type=int, default=64)
    pr.add_argument("--no-progress", action="store_true", help="no progress bar")
    pr.add_argument("--debug", action="store_true", default=argparse.SUPPRESS)

    an = sub.add_parser("analyze", help="analyses of a finished run")
    an_sub = an.add_subparsers(dest="what", required=True)
    for what, text in (("stg", "KL table (paper Table 5) and t-SNE of augmented tail features"),
                       ("figures", "per-class accuracy, confusion, reliability, t-SNE and decision-boundary "
                                   "figures in RUN_DIR/plots"),
                       ("fsa", "FSA: activation map and class-specific / class-generic split of a few tail samples"),
                       ("fasa", "FASA: per-class sampling rates and validation losses over the stage-3 epochs")):
        view = an_sub.add_parser(what, help=text)
        view.add_argument("run_dir")
        view.add_argument("--debug", action="store_true", default=argparse.SUPPRESS)
    return parser


def version() -> str:
    """The installed package's version (pyproject.toml), or "unknown" when run from a bare tree."""
    try:
        return metadata.version("tailaug")
    except metadata.PackageNotFoundError:
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    set_passive_wait()  # before torch loads its OpenMP runtime: idle threads sleep instead of spinning
    parser = build_parser()
    # overrides may stand before or after flags: collect the stragglers argparse leaves over
    args, extra = parser.parse_known_args(argv)
    stray = [e for e in extra if e.startswith("-") or "=" not in e or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    try:
        return _dispatch(args)
    except TailaugError as exc:
        if args.debug:
            raise
        print(f"tailaug: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"tailaug: interrupted{INTERRUPTED.get(args.command, '')}", file=sys.stderr)
        return 130


# What an interrupted command keeps, and how to go on from there.
INTERRUPTED = {
    "train": "; the last checkpoint (an epoch's end, or train.checkpoint_every_steps within one) is kept: add "
             "--resume to the same command to continue",
    "run": "; finished stages and the last stage-1 checkpoint are kept: run the same command again to continue",
}


def _dispatch(args) -> int:
    from . import commands

    if args.command == "train":
        commands.train(args.config, args.overrides, resume=args.resume, progress=not args.no_progress)
    elif args.command == "run" and args.seeds is not None:
        seeds, overrides = _split_seeds(args.seeds, args.overrides)
        commands.run_seeds(args.config, overrides, seeds, resume=args.resume, progress=not args.no_progress,
                           out=args.out)
    elif args.command == "run":
        if args.out is not None:
            raise TailaugError("--out names the report directory of --seeds; give --seeds too, or drop --out")
        commands.run(args.config, args.overrides, resume=args.resume, progress=not args.no_progress)
    elif args.command == "report":
        commands.report(args.run_dirs, args.out)
    elif args.command == "evaluate":
        commands.evaluate(Path(args.run_dir), args.overrides)
    elif args.command == "datasets":
        commands.describe(args.config, args.overrides)
    elif args.command == "analyze" and args.what == "figures":
        commands.analyze_figures(Path(args.run_dir))
    elif args.command == "embed":
        commands.embed(args.config, args.overrides, out=args.out, progress=not args.no_progress)
    elif args.command == "predict":
        commands.predict(Path(args.run_dir), args.inputs, classifier=args.classifier, top_k=args.top_k,
                         out=args.out, batch_size=args.batch_size, progress=not args.no_progress)
    elif args.command == "analyze":
        getattr(commands, f"analyze_{args.what}")(Path(args.run_dir))
    return 0


def _split_seeds(values: list[str], overrides: list[str]) -> tuple[list[int], list[str]]:
    """The integers after --seeds, and the overrides (key=value) that followed them."""
    seeds = []
    for v in values:
        if "=" in v:
            overrides = [*overrides, v]
        elif v.isdigit():
            seeds.append(int(v))
        else:
            raise TailaugError(f"--seeds takes non-negative integers (e.g. --seeds 0 1 2), got {v!r}")
    if not seeds:
        raise TailaugError("--seeds needs at least one seed, e.g. --seeds 0 1 2")
    return seeds, overrides


if __name__ == "__main__":
    os.environ.setdefault("MPLBACKEND", "Agg")
    sys.exit(main())
