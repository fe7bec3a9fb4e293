"""What a run leaves on disk: atomic writers, predictions, plots (``writing``) and the run folder's layout
(``layout``)."""

from .layout import METHOD_STATE_FILE, RunLayout, run_of_adapter
from .writing import (METRICS_FILE, atomic_write_dir, atomic_write_json, atomic_write_text, draw_accuracy_matrix,
                      format_matrix, format_pct, plot_accuracy_matrix, plot_average_accuracy, plot_lines, save_figure,
                      write_predictions)

__all__ = ["METHOD_STATE_FILE", "RunLayout", "run_of_adapter", "METRICS_FILE", "atomic_write_dir", "atomic_write_json", "atomic_write_text", "draw_accuracy_matrix",
           "format_matrix", "format_pct", "plot_accuracy_matrix", "plot_average_accuracy", "plot_lines", "save_figure",
           "write_predictions"]
