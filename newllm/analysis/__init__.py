"""Runs and Optuna studies -> pandas DataFrames and matplotlib figures.

Used by notebooks/ and by `python -m newllm.analyze`. Reads only what a run leaves on disk
(.hydra/*.yaml, metrics.json, history.csv, run.log, phase1_val_contexts.pt, checkpoint.pt,
tokenizer.json) and what Optuna stores; never imports newllm.training (arrows point down).
Every public name of the parts is re-exported here, so `from newllm import analysis` is all a caller needs:
  runs.py     the runs table (and its cache), one run's files       seeds.py   seeds -> mean and ci95
  studies.py  Optuna studies -> tables                              plots.py   figures of both

    runs = load_runs("outputs")                 # one row per run dir, cached incrementally
    aggregate(runs, by=["seed"])                # runs that differ only in seed -> mean and 95 % interval
    studies = load_studies("sqlite:///outputs/optuna.db")
    compare_studies(studies)                    # one summary row per study

Final comparisons use the test split (phase2/test_*): validation picked each run's weights and
pruned its trials, so its figures are optimistically biased; the defaults below say so in their names.
"""

from __future__ import annotations

from newllm.analysis.plots import (
    plot_context_spectrum,
    plot_metric_vs,
    plot_metric_vs_context_dim,
    plot_metric_vs_core_params,
    plot_optimization_history,
    plot_param_importances,
    plot_pareto_fronts,
    plot_training_curves,
    save_figure,
)
from newllm.analysis.runs import (
    CACHE_NAME,
    FINAL_METRIC,
    ID_COLUMNS,
    KEY_METRICS,
    LOG_LINE,
    NOISE_KEYS,
    AnalysisError,
    compare_architectures,
    context_spectrum,
    find_run_dirs,
    generate_text,
    latest_run,
    load_contexts,
    load_history,
    load_model,
    load_runs,
    read_metrics,
    read_run,
    select_sweep,
    size_key,
    summary_columns,
    varying_config_columns,
)
from newllm.analysis.scaling import fit_power_law, plot_power_law  # issue 15: newllm.analysis.fit_power_law
from newllm.analysis.seeds import (
    aggregate,
    ci95,
    metric_columns,
)
from newllm.analysis.studies import (
    CORE_PARAMS_ATTR,
    compare_studies,
    completed_trials,
    hypervolume,
    hypervolume_reference,
    load_studies,
    objective_names,
    objective_panels,
    param_importances,
    pareto_front,
    trials_frame,
)

__all__ = [
    "AnalysisError",
    "CACHE_NAME",
    "CORE_PARAMS_ATTR",
    "FINAL_METRIC",
    "ID_COLUMNS",
    "KEY_METRICS",
    "LOG_LINE",
    "NOISE_KEYS",
    "aggregate",
    "ci95",
    "compare_architectures",
    "compare_studies",
    "completed_trials",
    "context_spectrum",
    "find_run_dirs",
    "generate_text",
    "hypervolume",
    "hypervolume_reference",
    "latest_run",
    "load_contexts",
    "load_history",
    "load_model",
    "load_runs",
    "load_studies",
    "metric_columns",
    "objective_names",
    "objective_panels",
    "param_importances",
    "pareto_front",
    "plot_context_spectrum",
    "plot_metric_vs",
    "plot_metric_vs_context_dim",
    "plot_metric_vs_core_params",
    "plot_optimization_history",
    "plot_param_importances",
    "plot_pareto_fronts",
    "plot_training_curves",
    "read_metrics",
    "read_run",
    "save_figure",
    "select_sweep",
    "size_key",
    "summary_columns",
    "trials_frame",
    "varying_config_columns",
    "fit_power_law",
    "plot_power_law",
]
