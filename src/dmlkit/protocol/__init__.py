"""The "Metric Learning Reality Check" protocol (Musgrave et al., 2020) as one command.

- Splits: the test classes are the second half of the classes; the first half is split into
  class-disjoint cross-validation folds (4 by default: train on 3/4 of its classes, validate on
  1/4). No class is ever in two of training, validation and test.
- Search: per method, Optuna's TPE maximises the mean validation MAP@R over the folds; every
  run early-stops on its validation MAP@R. Studies live in SQLite by default, or a PostgreSQL /
  MySQL URL shared by workers on several machines, and survive killed workers.
- Test: the best hyperparameters are re-run; P@1, R-Precision and MAP@R are reported as mean
  ± 95% confidence interval, separated (per fold, averaged) and concatenated (the folds'
  normalised embeddings joined).

``dmlkit tune CONFIG`` runs the search, ``dmlkit bench CONFIG`` the search and the test re-runs;
see :mod:`dmlkit.protocol.config` for the config file. ``dmlkit sweep`` (:mod:`.sweep`) trains a
config once per value of one hyperparameter, for sensitivity plots; :mod:`.sweep_values` parses
its values and :mod:`.sweep_results` tabulates, writes and reads back its results.
"""

from .bench import (
    MethodResult,
    benchmark,
    concatenated_test_embeddings,
    rerun_dir,
    rerun_scores,
    results_markdown,
    write_results,
)
from .config import (
    TEST_METRICS,
    BenchConfig,
    MethodSpec,
    ProtocolConfig,
    SearchParam,
    bench_config_from_dict,
    bench_presets,
    load_bench_config,
    method_presets,
)
from .stats import Interval, confidence_interval
from .study import completed, open_study, run_fold, trial_dir, tune, tune_worker
from .sweep import run_sweep
from .sweep_results import (
    SweepResult,
    SweepRun,
    load_sweep,
    sweep_caption,
    sweep_markdown,
    sweep_table,
    write_sweep_results,
)
from .sweep_values import parse_values

__all__ = [
    "TEST_METRICS",
    "BenchConfig",
    "Interval",
    "MethodResult",
    "MethodSpec",
    "ProtocolConfig",
    "SearchParam",
    "SweepResult",
    "SweepRun",
    "bench_config_from_dict",
    "bench_presets",
    "benchmark",
    "completed",
    "concatenated_test_embeddings",
    "confidence_interval",
    "load_bench_config",
    "load_sweep",
    "method_presets",
    "open_study",
    "parse_values",
    "rerun_dir",
    "rerun_scores",
    "results_markdown",
    "run_fold",
    "run_sweep",
    "sweep_caption",
    "sweep_markdown",
    "sweep_table",
    "trial_dir",
    "tune",
    "tune_worker",
    "write_results",
    "write_sweep_results",
]
