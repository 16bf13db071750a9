"""Cached runs and rows: the layer every engine runs on.

* :mod:`~apexlens.runs.tokens` -- :func:`check_tokens`, the one check of token input;
* :mod:`~apexlens.runs.cache` -- :class:`Run` / :func:`cached_run` (what one forward pass left
  behind), :class:`Runs` (an experiment's clean and corrupted runs, named positions, memory
  budget);
* :mod:`~apexlens.runs.readout` -- :class:`Readout`: final residual streams -> per-example
  metric values, computing only what the metric reads;
* :mod:`~apexlens.runs.rows` -- rows: modified copies of the batch stacked along the batch
  axis (:func:`run_rows`), in chunks within the memory budget (:func:`row_chunks`): the one
  place rows are produced;
* :mod:`~apexlens.runs.ablation` -- what an ablated edge carries.
"""

from apexlens.runs.ablation import AblationValues, ablation_for, ablation_values
from apexlens.runs.cache import (
    Run,
    Runs,
    cache_names,
    cached_run,
    default_budget,
    rows_per_chunk,
    run_from,
)
from apexlens.runs.readout import MetricFn, Readout
from apexlens.runs.rows import progress_bar, row_chunks, run_rows, run_tokens, stack_rows
from apexlens.runs.tokens import check_pair, check_tokens, describe

__all__ = [
    "AblationValues",
    "MetricFn",
    "Readout",
    "Run",
    "Runs",
    "ablation_for",
    "ablation_values",
    "cache_names",
    "cached_run",
    "check_pair",
    "check_tokens",
    "default_budget",
    "describe",
    "progress_bar",
    "row_chunks",
    "rows_per_chunk",
    "run_from",
    "run_rows",
    "run_tokens",
    "stack_rows",
]
