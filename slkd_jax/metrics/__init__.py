"""Reporting: JSONL logs, TensorBoard, progress, tables, plots.

Used by the outer training loop, ``evaluate`` and ``report`` (never inside
``jit``). Importing it loads numpy and tqdm only: tensorboardX (which pulls
in torch when installed) is imported when a :class:`MetricWriter` is
enabled, matplotlib inside :func:`plot_history`.

One module per job, their public names all importable from here:

* :mod:`~slkd_jax.metrics.jsonl` -- :class:`JsonlWriter` (one JSON object
  per line, appended, resumable), :func:`read_jsonl`,
  :func:`read_jsonl_checked`, :func:`truncate_jsonl` (a resumed run's log
  cut back to its checkpoint, a line cut short by a crash removed).
* :mod:`~slkd_jax.metrics.writer` -- :class:`MetricWriter`: JSONL plus
  TensorBoard event files (``tensorboardX``); a no-op on non-zero
  processes.
* :mod:`~slkd_jax.metrics.progress` -- :class:`ProgressBar`: ``tqdm``
  progress with images/s and ETA; plain lines every 10% when not on a
  terminal.
* :mod:`~slkd_jax.metrics.tables` -- :func:`best_and_last`,
  :func:`network_rows`, :func:`stage_row`, :func:`mean_std`,
  :func:`summary_table`: the tables of training, ``evaluate`` and
  ``report`` (best-epoch and last-epoch accuracy, mean ± std over seeds).
* :mod:`~slkd_jax.metrics.plots` -- :func:`plot_history`: accuracy curves
  and the paper's Figure 2 learning trajectories as PNG files.
* :mod:`~slkd_jax.metrics.values` -- numbers as JSON values and scalars.
"""

from slkd_jax.metrics.jsonl import (JsonlWriter, read_jsonl,
                                    read_jsonl_checked, truncate_jsonl)
from slkd_jax.metrics.plots import plot_history
from slkd_jax.metrics.progress import ProgressBar
from slkd_jax.metrics.tables import (NETWORK_COLUMNS, STAGE_COLUMNS,
                                     best_and_last, mean_std, network_rows,
                                     networks, reported_history, stage_row,
                                     summary_table)
from slkd_jax.metrics.writer import MetricWriter

__all__ = ["JsonlWriter", "MetricWriter", "NETWORK_COLUMNS", "ProgressBar",
           "STAGE_COLUMNS", "best_and_last", "mean_std", "network_rows",
           "networks", "plot_history", "read_jsonl", "read_jsonl_checked",
           "reported_history", "stage_row", "summary_table",
           "truncate_jsonl"]
