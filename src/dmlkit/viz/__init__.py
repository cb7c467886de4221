"""Pictures of runs and benchmarks. Plots read run folders (logs, results, checkpoints) and
embeddings; nothing below this floor imports it.

- :func:`plot_training_log`: a run's training curves (moving-average smoothing,
  :func:`moving_average`, edge-aware) and validation metrics.
- :func:`plot_embedding_maps`: 2-D maps of embeddings (UMAP, or PCA without umap-learn),
  coloured by class, panels side by side.
- :func:`plot_retrieval_grid`: queries and their nearest neighbours, correct and wrong marked
  (:func:`retrieval_lists`, :func:`worst_queries`).
- :func:`plot_sweep`: final metrics and curves against a swept hyperparameter.
- :func:`write_report`: one self-contained HTML page for a run, a sweep or a benchmark.
"""

from .curves import plot_training_log
from .embedding_map import EmbeddingPanel, plot_embedding_maps, project_2d, umap_available
from .history import plot_study_history
from .report import ReportOptions, report_kind, write_report
from .retrieval_grid import (
    RetrievalLists,
    item_image,
    plot_retrieval_grid,
    retrieval_lists,
    worst_queries,
)
from .smoothing import auto_window, moving_average
from .sweep import plot_sweep

__all__ = [
    "EmbeddingPanel",
    "ReportOptions",
    "RetrievalLists",
    "auto_window",
    "item_image",
    "moving_average",
    "plot_embedding_maps",
    "plot_retrieval_grid",
    "plot_study_history",
    "plot_sweep",
    "plot_training_log",
    "project_2d",
    "report_kind",
    "retrieval_lists",
    "umap_available",
    "worst_queries",
    "write_report",
]
