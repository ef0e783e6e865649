"""Command line: ``python -m optax_path.experiments reproduce`` (or ``optax-path``).

``reproduce`` runs the experiments of Section 5 of the paper on one data set: the
step-size search on a validation split, then the final runs of every method from the
balanced and the unbalanced initialisation, writing ``metrics.csv``, ``selection.csv``,
``figure.png`` and ``summary.md``. ``plot`` combines several runs into one figure.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import textwrap
import time
from collections.abc import Sequence

import jax
import numpy as np

from optax_path.experiments import data, report, selection
from optax_path.experiments.models import MLP, init_params
from optax_path.experiments.training import (
    EVAL_CHUNK,
    METHODS,
    RunSpec,
    init_optimizer,
    make_evaluate,
    make_optimizer,
    make_train_step,
    to_device,
    train,
)

INITS = ("balanced", "unbalanced")
#: Defaults of ``reproduce``: sized so the digits run takes about 2 minutes on 2 cores.
DEFAULTS = {
    "hidden": (512, 512),
    "epochs": 40,
    "search_epochs": 20,
    "batch_size": 100,
    "alphas": (0, 1, 2, 3, 4),
}
#: ``--paper``: the settings of Section 5 (2x4000 units, 100 epochs, alpha in 0..10).
PAPER = {
    "hidden": (4000, 4000),
    "epochs": 100,
    "search_epochs": 100,
    "batch_size": 100,
    "alphas": tuple(range(11)),
    "unbalanced_units": 2000,
}
#: The paper rescales 2000 units of its 2x4000 net; smaller nets scale this number.
PAPER_UNBALANCED_FRACTION = 2000 / 8000


@dataclasses.dataclass(frozen=True)
class Config:
    """Settings of a ``reproduce`` run (see ``--help``)."""

    dataset: str
    data_dir: str | None
    hidden: tuple[int, ...]
    epochs: int
    search_epochs: int
    batch_size: int
    dropout: float
    seed: int
    methods: tuple[str, ...]
    inits: tuple[str, ...]
    unbalanced_units: int
    alphas: tuple[float, ...]
    learning_rates: dict[str, float]
    search_init: str
    dtype: str
    out: str
    quiet: bool


def parse_lr(text: str) -> tuple[str, float]:
    """Parses ``--lr METHOD=VALUE``.

    Args:
      text: E.g. ``"path-sgd=0.1"``.

    Returns:
      ``(method, value)``.

    Raises:
      argparse.ArgumentTypeError: For a malformed value or an unknown method.
    """
    method, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected METHOD=VALUE, got {text!r}")
    if method not in METHODS:
        raise argparse.ArgumentTypeError(
            f"unknown method {method!r}; choose from {', '.join(METHODS)}"
        )
    try:
        lr = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {value!r}") from None
    if not lr > 0:
        raise argparse.ArgumentTypeError(f"step size must be positive, got {value!r}")
    return method, lr


def methods_epilog() -> str:
    """The list of methods shown by ``--help``."""
    width = max(map(len, METHODS))
    lines = ["methods:"] + [f"  {name:<{width}}  {m.description}" for name, m in METHODS.items()]
    return "\n".join(lines)


def add_reproduce_parser(subparsers: argparse._SubParsersAction) -> None:
    """Declares the ``reproduce`` subcommand."""
    p = subparsers.add_parser(
        "reproduce",
        help="run the paper's comparison on one data set",
        description=textwrap.fill(
            "Train a ReLU MLP with each method from the balanced and the unbalanced init, "
            "after choosing each method's step size 10^-alpha on a validation split (the "
            "paper's rule: the alpha reaching the lowest validation error fastest; searched "
            "on the balanced init unless --search-init each), and write metrics.csv, "
            "selection.csv, figure.png and summary.md."
        ),
        epilog=methods_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--dataset",
        choices=data.DATASETS,
        default="digits",
        help="data set (default: digits, bundled with scikit-learn)",
    )
    p.add_argument(
        "--data-dir", help="data directory (default: $OPTAX_PATH_DATA or ~/.cache/optax_path)"
    )
    p.add_argument(
        "--hidden",
        type=int,
        nargs="+",
        metavar="H",
        help=f"hidden layer widths (default: {_show(DEFAULTS['hidden'])}; paper: 4000 4000)",
    )
    p.add_argument(
        "--epochs", type=int, help=f"epochs of the final runs (default: {DEFAULTS['epochs']})"
    )
    p.add_argument(
        "--search-epochs",
        type=int,
        help=f"epochs of each step-size search run (default: {DEFAULTS['search_epochs']})",
    )
    p.add_argument("--batch-size", type=int, help="mini-batch size (default: 100)")
    p.add_argument(
        "--dropout",
        type=float,
        default=0.0,
        help="drop probability of hidden units; retain probability is 1-dropout "
        "(default: 0; paper: 0 and 0.5)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of init, split, batches, dropout")
    p.add_argument(
        "--methods",
        nargs="+",
        choices=list(METHODS),
        default=["path-sgd", "sgd", "adagrad"],
        metavar="METHOD",
        help="methods to compare (listed below; default: path-sgd sgd adagrad)",
    )
    p.add_argument(
        "--inits",
        nargs="+",
        choices=INITS,
        default=list(INITS),
        help="initialisations (default: both)",
    )
    p.add_argument(
        "--unbalanced-units",
        type=int,
        metavar="K",
        help="hidden units rescaled by the unbalanced init, drawn with replacement "
        "(default: round(2000 * total hidden / 8000), as the paper's 2000 of 2x4000)",
    )
    p.add_argument(
        "--alphas",
        type=float,
        nargs="+",
        metavar="ALPHA",
        help=f"step sizes 10^-alpha to search (default: {_show(DEFAULTS['alphas'])}; paper: 0..10)",
    )
    p.add_argument(
        "--lr",
        type=parse_lr,
        action="append",
        default=[],
        metavar="METHOD=VALUE",
        help="fix a method's step size and skip its search (repeatable)",
    )
    p.add_argument(
        "--search-init",
        choices=("balanced", "each"),
        default="balanced",
        help="search the step size on the balanced init and use it for both "
        "(default), or search separately for each init",
    )
    p.add_argument(
        "--paper",
        action="store_true",
        help="the paper's settings: --hidden 4000 4000 --batch-size 100 --epochs 100 "
        "--search-epochs 100 --alphas 0..10 --unbalanced-units 2000 (explicit "
        "options still win)",
    )
    p.add_argument(
        "--dtype",
        choices=("float64", "float32"),
        default="float64",
        help="floating-point precision (default: float64, in which the Path-SGD "
        "balanced/unbalanced curves agree to rounding; in float32, training at the chosen "
        "steps can amplify rounding differences between them to ~1e-2)",
    )
    p.add_argument(
        "--out", help="output directory (default: runs/<dataset>, runs/<dataset>-dropout<p>)"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def add_plot_parser(subparsers: argparse._SubParsersAction) -> None:
    """Declares the ``plot`` subcommand."""
    p = subparsers.add_parser(
        "plot",
        help="combine runs into one figure (a row per data set)",
        description="Combine the metrics.csv of several run directories into one figure.",
    )
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="directories with metrics.csv")
    p.add_argument("--out", default="figure.png", help="image file (default: %(default)s)")
    p.add_argument("--summary", help="also write a combined summary.md here")


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser."""
    parser = argparse.ArgumentParser(
        prog="optax-path",
        description="Experiments of Path-SGD (Neyshabur, Salakhutdinov & Srebro, NeurIPS 2015).",
    )
    subparsers = parser.add_subparsers(dest="command", required=True)
    add_reproduce_parser(subparsers)
    add_plot_parser(subparsers)
    return parser


def _show(values: Sequence[float]) -> str:
    return " ".join(f"{v:g}" for v in values)


def _pick(args: argparse.Namespace, name: str) -> object:
    """An explicit option, else the paper's value under ``--paper``, else the default."""
    value = getattr(args, name)
    if value is not None:
        return value
    return PAPER[name] if args.paper else DEFAULTS[name]


def default_unbalanced_units(hidden: Sequence[int]) -> int:
    """The paper's 2000 rescaled units of 2x4000, scaled to the net's size (at least 1).

    Example:
      >>> default_unbalanced_units([4000, 4000]), default_unbalanced_units([256, 256])
      (2000, 128)
    """
    return max(1, round(PAPER_UNBALANCED_FRACTION * sum(hidden)))


def default_out(dataset: str, dropout: float) -> str:
    """The default output directory, e.g. ``runs/mnist`` or ``runs/mnist-dropout0.5``.

    Example:
      >>> default_out("digits", 0.0), default_out("mnist", 0.5)
      ('runs/digits', 'runs/mnist-dropout0.5')
    """
    name = dataset if not dropout else f"{dataset}-dropout{dropout:g}"
    return os.path.join("runs", name)


def make_config(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Config:
    """Resolves the ``reproduce`` options (defaults, ``--paper``) and checks them."""
    hidden = tuple(_pick(args, "hidden"))
    units = args.unbalanced_units
    if units is None:
        units = PAPER["unbalanced_units"] if args.paper else default_unbalanced_units(hidden)
    lrs = dict(args.lr)
    extra = sorted(set(lrs) - set(args.methods))
    if extra:
        parser.error(f"--lr given for {', '.join(extra)}, which is not in --methods")
    config = Config(
        dataset=args.dataset,
        data_dir=args.data_dir,
        hidden=hidden,
        epochs=_pick(args, "epochs"),
        search_epochs=_pick(args, "search_epochs"),
        batch_size=_pick(args, "batch_size"),
        dropout=args.dropout,
        seed=args.seed,
        methods=tuple(dict.fromkeys(args.methods)),
        inits=tuple(dict.fromkeys(args.inits)),
        unbalanced_units=units,
        alphas=tuple(_pick(args, "alphas")),
        learning_rates=lrs,
        search_init=args.search_init,
        dtype=args.dtype,
        out=args.out or default_out(args.dataset, args.dropout),
        quiet=args.quiet,
    )
    check_config(config, parser)
    return config


def check_config(config: Config, parser: argparse.ArgumentParser) -> None:
    """Rejects settings that cannot run."""
    positive = {
        "epochs": config.epochs,
        "batch_size": config.batch_size,
        "unbalanced_units": config.unbalanced_units,
        "search_epochs": config.search_epochs,
    }
    for name, value in positive.items():
        if value < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if min(config.hidden) < 1:
        parser.error("--hidden widths must be at least 1")
    if not 0 <= config.dropout < 1:
        parser.error("--dropout must be in [0, 1)")


class Experiment:
    """The data, model and jitted functions shared by all runs of a ``reproduce``."""

    def __init__(self, config: Config, dataset: data.Dataset):
        """Puts the data on the device and draws the initial parameters.

        Args:
          config: The settings.
          dataset: The loaded data set.
        """
        self.config = config
        self.dataset = dataset
        self.model = MLP(config.hidden, dataset.num_classes, config.dropout)
        num_train, num_test = len(dataset.train_labels), len(dataset.test_labels)
        self.evaluate = make_evaluate(self.model, min(EVAL_CHUNK, num_train))
        self.data = to_device(
            np.concatenate([dataset.train_images, dataset.test_images]),
            np.concatenate([dataset.train_labels, dataset.test_labels]),
            config.dtype,
        )
        self.train = np.arange(num_train)
        self.test = num_train + np.arange(num_test)
        self.fit, self.val = selection.split_validation(num_train, config.seed)
        self.params = initial_params(config, self.model, dataset.train_images.shape[1:])

    def spec(self, train_step, search: bool) -> RunSpec:
        """The run specification of a search run or a final run."""
        c = self.config
        if search:
            return RunSpec(
                train_step,
                self.evaluate,
                self.data,
                self.fit,
                {"val": self.val},
                c.search_epochs,
                c.batch_size,
                c.seed,
            )
        evals = {"train": self.train, "test": self.test}
        return RunSpec(
            train_step, self.evaluate, self.data, self.train, evals, c.epochs, c.batch_size, c.seed
        )


def initial_params(config: Config, model: MLP, input_shape: Sequence[int]) -> dict:
    """The balanced and (if asked for) unbalanced initial parameters, by init name."""
    key_init, key_unbalance = jax.random.split(jax.random.key(config.seed))
    balanced = init_params(model, key_init, input_shape)
    params = {"balanced": jax.tree.map(lambda x: x.astype(config.dtype), balanced)}
    if "unbalanced" in config.inits:
        import optax_path

        unbalance = jax.jit(optax_path.unbalance, static_argnums=2)
        params["unbalanced"] = unbalance(key_unbalance, params["balanced"], config.unbalanced_units)
    return params


def search_method(exp: Experiment, method: str, tx, train_step, init: str) -> list[dict]:
    """The step-size search of one method on one init; returns selection.csv rows."""
    spec = exp.spec(train_step, search=True)

    def run(alpha: float) -> tuple[list[float], bool]:
        lr = selection.learning_rate(alpha)
        history = train(
            spec,
            exp.params[init],
            init_optimizer(tx, exp.params[init], lr),
            desc=f"search {method} {init} lr=1e-{alpha:g}",
            progress=not exp.config.quiet,
        )
        diverged = len(history) < spec.epochs + 1
        return [h["val_error"] for h in history], diverged

    candidates, chosen = selection.search(run, exp.config.alphas)
    return [
        {
            "dataset": exp.dataset.name,
            "method": method,
            "init": init,
            "alpha": c.alpha,
            "learning_rate": c.learning_rate,
            "best_val_error": c.best_error,
            "best_epoch": c.best_epoch,
            "final_val_error": c.final_error,
            "diverged": int(c.diverged),
            "chosen": int(c is chosen),
        }
        for c in candidates
    ]


def final_run(exp: Experiment, method: str, tx, train_step, init: str, lr: float) -> list[dict]:
    """Trains on the whole training set; returns metrics.csv rows."""
    params = exp.params[init]
    history = train(
        exp.spec(train_step, search=False),
        params,
        init_optimizer(tx, params, lr),
        desc=f"{method} {init} lr={lr:.0e}",
        progress=not exp.config.quiet,
    )
    base = {
        "dataset": exp.dataset.name,
        "method": method,
        "init": init,
        "dropout": exp.config.dropout,
        "learning_rate": lr,
    }
    return [{**base, **h} for h in history]


def run_method(exp: Experiment, method: str) -> tuple[list[dict], list[dict]]:
    """Step-size search (unless fixed by ``--lr``) and final runs of one method.

    Returns:
      ``(metrics rows, selection rows)``.
    """
    c = exp.config
    tx = make_optimizer(method)
    train_step = make_train_step(exp.model, tx)
    search_inits = ("balanced",) if c.search_init == "balanced" else c.inits
    lrs, chosen_rows = {}, []
    for init in search_inits:
        if method in c.learning_rates:
            lrs[init] = c.learning_rates[method]
            continue
        rows = search_method(exp, method, tx, train_step, init)
        chosen_rows += rows
        lrs[init] = next(r["learning_rate"] for r in rows if r["chosen"])
    metrics = []
    for init in c.inits:
        lr = lrs.get(init, lrs.get("balanced"))
        metrics += final_run(exp, method, tx, train_step, init, lr)
    return metrics, chosen_rows


def preamble(config: Config, dataset: data.Dataset, seconds: float) -> list[str]:
    """The settings lines at the top of ``summary.md``."""
    n = len(dataset.train_labels)
    val = selection.validation_size(n)
    search = (
        "on the balanced init, used for both inits"
        if config.search_init == "balanced"
        else "separately for each init"
    )
    fixed = ", ".join(f"{m}={v:g}" for m, v in config.learning_rates.items()) or "none"
    return [
        (
            f"Data: {dataset.name}, {n} training and {len(dataset.test_labels)} test examples. "
            f"ReLU MLP, hidden layers {_show(config.hidden)}, batch {config.batch_size}, "
            f"{config.epochs} epochs, dropout {config.dropout:g}, seed {config.seed}, {config.dtype}. "
            f"Unbalanced init: {config.unbalanced_units} hidden units rescaled."
        ),
        "",
        (
            f"Step sizes 10^-alpha, alpha in {{{_show(config.alphas)}}}, chosen {search}: "
            f"{config.search_epochs} epochs on {n - val} examples, validation on the other {val} "
            f"(lowest validation error, reached first). Fixed by --lr: {fixed}."
        ),
        "",
        f"Wall time: {seconds:.0f} s.",
    ]


def reproduce(config: Config) -> None:
    """Runs the experiment and writes its four outputs to ``config.out``."""
    start = time.perf_counter()
    dataset = data.load_dataset(config.dataset, config.data_dir)
    with jax.enable_x64(config.dtype == "float64"):
        metrics, chosen = run_all(config, dataset)
    report.plot(metrics, os.path.join(config.out, "figure.png"))
    lines = preamble(config, dataset, time.perf_counter() - start)
    report.write_summary(os.path.join(config.out, "summary.md"), metrics, chosen, lines)
    if not config.quiet:
        print(f"Wrote metrics.csv, selection.csv, figure.png, summary.md to {config.out}")


def run_all(config: Config, dataset: data.Dataset) -> tuple[list[dict], list[dict]]:
    """Runs every method, rewriting the two CSV files after each; returns their rows."""
    exp = Experiment(config, dataset)
    os.makedirs(config.out, exist_ok=True)
    metrics, chosen = [], []
    for method in config.methods:
        rows, sel = run_method(exp, method)
        metrics, chosen = metrics + rows, chosen + sel
        report.write_csv(os.path.join(config.out, "metrics.csv"), report.METRIC_COLUMNS, metrics)
        report.write_csv(
            os.path.join(config.out, "selection.csv"), report.SELECTION_COLUMNS, chosen
        )
    return metrics, chosen


def plot_command(args: argparse.Namespace) -> None:
    """Combines run directories into one figure (and optionally one summary)."""
    metrics, chosen = report.combine_runs({d: report.load_run(d) for d in args.run_dirs})
    report.plot(metrics, args.out)
    if args.summary:
        report.write_summary(args.summary, metrics, chosen, [f"Runs: {', '.join(args.run_dirs)}."])


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m optax_path.experiments`` and ``optax-path``.

    Args:
      argv: Arguments (default: ``sys.argv[1:]``).

    Returns:
      The exit status.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "reproduce":
        reproduce(make_config(args, parser))
    else:
        plot_command(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
