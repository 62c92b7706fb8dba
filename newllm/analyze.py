"""`python -m newllm.analyze`: the runs table and the Optuna study comparison on the command line.

    python -m newllm.analyze runs outputs/ --sort phase2/val_ppl --csv runs.csv
    python -m newllm.analyze runs outputs/ --group seed --csv seeds.csv   # mean and 95 % t-interval over seeds
    python -m newllm.analyze studies --storage sqlite:///outputs/optuna.db --out outputs/analysis
    python -m newllm.analyze positions ROOT | recall ROOT | scaling ROOT [--offset]   # the instruments
    python -m newllm.analyze compare outputs/sweeps/compare_models/<storage folder>   # +sweep=compare_models
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import pandas as pd

from newllm import analysis, keys
from newllm.errors import NewllmError
from newllm.runtime.fileio import atomic_write


def _print_table(df: pd.DataFrame) -> None:
    with pd.option_context("display.max_rows", None, "display.max_columns", None, "display.width", 250,
                           "display.float_format", "{:.4g}".format, "display.max_colwidth", 60):
        print(df.to_string(index=False))


def _metric_columns(table: pd.DataFrame, names: list[str]) -> list[str]:
    """In an aggregated table a metric name stands for its /mean and /ci95 columns."""
    out = []
    for name in names:
        out += [name] if name in table else [c for c in (f"{name}/mean", f"{name}/ci95") if c in table]
    return out


def cmd_runs(args: argparse.Namespace) -> None:
    runs = analysis.load_runs(args.root, cache=not args.no_cache)
    if args.status:
        runs = runs[runs["status"] == args.status]
    counts = runs["status"].value_counts().to_dict()
    title = f"{len(runs)} runs under {args.root} ({', '.join(f'{n} {s}' for s, n in counts.items())})"
    if args.group:
        runs = analysis.aggregate(runs, by=args.group.split(","))
        title += f"; {len(runs)} groups of completed runs differing only in {args.group} (mean, 95 % t-interval)"
        default_cols = [c for c in runs.columns if "/" not in c or c.startswith("choices/")]
        default_cols += _metric_columns(runs, analysis.KEY_METRICS)
    else:
        default_cols = analysis.summary_columns(runs)
    if args.sort:
        sort = (_metric_columns(runs, [args.sort]) or [args.sort])[0]
        if sort not in runs:
            raise analysis.AnalysisError(f"--sort {args.sort!r} is not a column; e.g. {analysis.KEY_METRICS}")
        runs = runs.sort_values(sort, ascending=not args.desc, na_position="last")
    if args.csv:
        atomic_write(args.csv, lambda tmp: runs.to_csv(tmp, index=False))
        print(f"wrote {len(runs)} rows x {runs.shape[1]} columns to {args.csv}", file=sys.stderr)
    cols = _metric_columns(runs, args.columns.split(",")) if args.columns else default_cols
    unknown = [c for c in (args.columns.split(",") if args.columns else []) if not _metric_columns(runs, [c])]
    if unknown:
        raise analysis.AnalysisError(f"--columns {unknown} not in the runs table (see --csv for all columns)")
    print(title)
    _print_table(runs[cols])


def _slug(name: str) -> str:
    """phase2/val_ppl -> phase2_val_ppl (for file names)."""
    return re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_")


def cmd_studies(args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    studies = analysis.load_studies(args.storage, args.study)
    print("studies:")
    _print_table(analysis.compare_studies(studies))
    for s in studies:
        print(f"\nbest trials of {s.study_name}:")
        _print_table(analysis.pareto_front(s))
    out = Path(args.out)
    # Each study is plotted with its own objectives: one panel per objective name, one Pareto plot per pair.
    plots = {"optimization_history.png": analysis.plot_optimization_history(studies)}
    fronts: dict[tuple[str, ...], list] = {}
    for s in studies:
        if len(s.directions) >= 2:
            fronts.setdefault(tuple(analysis.objective_names(s)[:2]), []).append(s)
    for (x, y), group in fronts.items():
        plots[f"pareto_{_slug(x)}_vs_{_slug(y)}.png"] = analysis.plot_pareto_fronts(group)
    for name in analysis.objective_panels(studies):
        plots[f"importances_{_slug(name)}.png"] = analysis.plot_param_importances(studies, objective=name)
    for name, fig in plots.items():
        analysis.save_figure(fig, out / name)
    print(f"\nwrote {len(plots)} plots to {out}/: {', '.join(plots)}")


def cmd_instrument(args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from newllm.analysis import instruments as ia

    out = Path(args.out or Path(args.root) / "analysis")
    if args.command == "positions":
        table = ia.position_table(args.root)
        _print_table(table)
        fig, name = ia.plot_positions(table), "loss_by_position.png"
    elif args.command == "recall":
        table = ia.recall_table(args.root)
        _print_table(table)
        fig, name = ia.plot_recall(table), "recall_vs_pairs.png"
        frontier = ia.recall_frontier(args.root)  # accuracy against model/state_floats, one line per family
        print("\nrecall against state size (model/state_floats):")
        _print_table(frontier)
        analysis.save_figure(ia.plot_recall_frontier(frontier), out / "recall_vs_state.png")
        print(f"wrote {out / 'recall_vs_state.png'}")
    else:
        runs, fit = ia.scaling_fit(args.root, args.y, offset=args.offset)
        print(fit.summary(args.y) + f"\nN = {keys.DATA_TRAIN_TOKENS}; log residuals by N (a trend is a misfit):")
        _print_table(fit.residuals_by_x())
        fig, name = analysis_scaling_plot(runs, args.y, fit), "data_scaling.png"
    analysis.save_figure(fig, out / name)
    print(f"wrote {out / name}")


def analysis_scaling_plot(runs, y, fit):
    from newllm.analysis.scaling import plot_power_law

    return plot_power_law(runs, keys.DATA_TRAIN_TOKENS, y, fit)


def cmd_compare(args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from newllm.analysis.compare import compare_models, plot_compare

    table = compare_models(args.root, reference=args.reference)
    print(f"compare_models below {args.root}: test ppl over seeds (mean, 95 % t-interval), paired by seed "
          f"against {args.reference}; wrote {Path(args.root) / 'compare_models.csv'}")
    _print_table(table)
    figure = Path(args.root) / "analysis" / "compare_models.png"
    analysis.save_figure(plot_compare(table), figure)
    print(f"wrote {figure} (test ppl against state size and training FLOPs)")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m newllm.analyze", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("runs", help="one table of every run below a folder")
    r.add_argument("root", nargs="?", default="outputs", help="folder holding runs/ and multirun/ (default outputs)")
    r.add_argument("--sort", help="column to sort by, e.g. phase2/val_ppl (ascending)")
    r.add_argument("--desc", action="store_true", help="sort descending")
    r.add_argument("--status", choices=["completed", "pruned", "failed", "incomplete"],
                   help="only runs with this status")
    r.add_argument("--columns", help="comma-separated columns to print (default: ids, what varied, key metrics)")
    r.add_argument("--group", metavar="KEY[,KEY]",
                   help="aggregate runs whose configs differ only in these keys (e.g. seed): n, and per metric "
                        "<metric>/mean and <metric>/ci95 (Student-t half-width, NaN for n = 1)")
    r.add_argument("--csv", help="also write the full table (every column; with --group the aggregated one)")
    r.add_argument("--no-cache", action="store_true", help=f"re-read every run dir (ignore {analysis.CACHE_NAME})")
    r.set_defaults(func=cmd_runs)
    s = sub.add_parser("studies", help="compare the Optuna studies in a storage and plot them")
    s.add_argument("--storage", required=True, nargs="+", help="Optuna storage URL(s), e.g. sqlite:///outputs/optuna.db")
    s.add_argument("--study", nargs="+", help="only these study names (default: all)")
    s.add_argument("--out", default="outputs/analysis", help="folder for the plots (default outputs/analysis)")
    s.set_defaults(func=cmd_studies)
    for name, text in (("positions", "loss by position per run, architectures overlaid"),
                       ("recall", "recall accuracy vs num_pairs and vs state size (log) per architecture"),
                       ("scaling", "power-law fit of loss against data/train_tokens")):
        c = sub.add_parser(name, help=text)
        c.add_argument("root", help="folder of runs (e.g. a sweep dir)")
        c.add_argument("--out", help="folder for the plot (default ROOT/analysis)")
        if name == "scaling":
            c.add_argument("--y", default=keys.P2_TEST_LOSS, help="the loss column (default phase2/test_loss)")
            c.add_argument("--offset", action="store_true", help="fit a N^-b + c (irreducible loss c)")
        c.set_defaults(func=cmd_instrument)
    c = sub.add_parser("compare", help="the +sweep=compare_models table: one row per model (writes compare_models.csv)")
    c.add_argument("root", help="the sweep folder of +sweep=compare_models (or any folder above it)")
    c.add_argument("--reference", default="layerwise", help="model label the paired differences are taken against")
    c.set_defaults(func=cmd_compare)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        args.func(args)
    except NewllmError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
