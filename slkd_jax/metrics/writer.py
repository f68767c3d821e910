"""A stage's metric writer: ``metrics.jsonl`` plus TensorBoard event files.

The JSONL records are the log of record (exactly what the loop passes).
TensorBoard gets a view made for reading curves: every accuracy in percent
(train ``*/acc`` is a fraction in the records, eval ``*/top1`` a percent),
the training throughput in images/s, the run's config as text once, and no
curve of the epoch counter.
"""

from __future__ import annotations

import itertools
import json
import os
import time
from typing import Any, Mapping

from slkd_jax.metrics.jsonl import JsonlWriter
from slkd_jax.metrics.values import to_scalar

# Distinguishes the event files of writers opened in the same second by the
# same process; tensorboardX names files by second and host and would
# overwrite the first.
_WRITER_COUNT = itertools.count()

#: The TensorBoard tag of the training throughput.
THROUGHPUT_TAG = "train/images_per_second"
#: The TensorBoard text tag of the run's config.
CONFIG_TAG = "config"
# The prefix of the records the throughput is measured between.
_TRAIN_PREFIX = "train/"


def _tensorboard_value(key: str, value: Any) -> float | None:
  """The scalar TensorBoard shows for ``key`` (None: not shown): accuracy
  fractions (``.../acc``) in percent, the epoch counter left out."""
  name = key.rsplit("/", 1)[-1]
  if name == "epoch":
    return None
  scalar = to_scalar(value)
  if scalar is not None and name == "acc":
    scalar *= 100.0
  return scalar


def _config_text(config: Any, workdir: str) -> str | None:
  """The config as indented JSON: ``config`` (a mapping, a ConfigDict or
  JSON text), else ``<workdir>/config.json``; None when there is none."""
  if config is None:
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
      return None
    with open(path, encoding="utf-8") as f:
      config = f.read()
  if hasattr(config, "to_json_best_effort"):  # ml_collections.ConfigDict
    config = config.to_json_best_effort()
  if isinstance(config, str):
    try:
      config = json.loads(config)
    except json.JSONDecodeError:
      return config
  return json.dumps(config, indent=2, default=str)


class MetricWriter:
  """JSONL (``<workdir>/metrics.jsonl``) plus TensorBoard event files
  (``<workdir>/tensorboard/``).

  The event files are written by ``tensorboardX.SummaryWriter`` (no
  TensorFlow needed), imported only when a writer is enabled. Each writer
  starts a new file, so a resumed run adds a file next to the old ones and
  TensorBoard merges them by step. With ``enabled=False`` (every process but
  process 0 of a multi-host run) each call is a no-op and nothing is created
  on disk, so the caller needs no ``if process_index == 0`` around its
  logging.
  """

  def __init__(self, workdir: str | os.PathLike, enabled: bool = True,
               flush_secs: float = 10.0, *, config: Any = None,
               images_per_step: int | None = None,
               network_names: Mapping[str, str] | None = None):
    """Opens both writers under ``workdir`` when ``enabled``; TensorBoard
    sees new scalars within ``flush_secs`` (written by a background thread).

    ``config``: the run's config, shown once as TensorBoard text (default:
    the ``config.json`` training wrote in ``workdir``).
    ``images_per_step``: the global batch, for the throughput curve
    (default: that config's ``batch_size``; none: no curve).
    ``network_names``: TensorBoard tags' network names as shown (the
    teacher stage's ``student`` is the teacher); the JSONL keeps the keys.
    """
    self.workdir = os.fspath(workdir)
    self.enabled = enabled
    self._jsonl: JsonlWriter | None = None
    self._tb = None
    self._clock = time.perf_counter  # replaced by tests
    self._last_train: tuple[int, float] | None = None
    self._names = dict(network_names or {})
    if not enabled:
      return
    from tensorboardX import SummaryWriter
    os.makedirs(self.workdir, exist_ok=True)
    self._config_text = _config_text(config, self.workdir)
    if images_per_step is None and self._config_text is not None:
      images_per_step = _batch_size(self._config_text)
    self._images_per_step = images_per_step
    self._jsonl = JsonlWriter(os.path.join(self.workdir, "metrics.jsonl"))
    self._tb = SummaryWriter(
        os.path.join(self.workdir, "tensorboard"), flush_secs=flush_secs,
        filename_suffix=f".{os.getpid()}.{next(_WRITER_COUNT)}")

  def write(self, step: int, scalars: Mapping[str, Any], *, prefix: str = "",
            **extra_fields: Any) -> None:
    """Logs ``scalars`` at ``step`` under keys/tags ``prefix + key``.

    ``extra_fields`` (e.g. ``epoch=3, stage="slkd"``) go to the JSONL line
    only; TensorBoard gets the numeric scalars (as float32, accuracies in
    percent), others are skipped.
    """
    if not self.enabled or self._jsonl is None:
      return
    named = {f"{prefix}{key}": value for key, value in scalars.items()}
    self._jsonl.write(step, named, **extra_fields)
    if self._config_text is not None:  # once, at the writer's first step
      self._tb.add_text(CONFIG_TAG, _as_markdown(self._config_text),
                        int(step))
      self._config_text = None
    for tag, value in named.items():
      scalar = _tensorboard_value(tag, value)
      if scalar is not None:
        self._tb.add_scalar(self._shown(tag), scalar, int(step))
    self._write_throughput(int(step), prefix == _TRAIN_PREFIX)

  def _shown(self, tag: str) -> str:
    """``tag`` with its network (the part after the prefix) as shown."""
    prefix, sep, rest = tag.partition("/")
    network, sep2, quantity = rest.partition("/")
    if not sep or not sep2 or network not in self._names:
      return tag
    return f"{prefix}/{self._names[network]}/{quantity}"

  def _write_throughput(self, step: int, is_train: bool) -> None:
    """images/s between two consecutive train records. Any other record
    (an evaluation, a checkpoint's pause) restarts the measurement, as does
    a new writer (its first interval includes compilation)."""
    now = self._clock()
    last, self._last_train = self._last_train, (
        (step, now) if is_train else None)
    if not (is_train and last and self._images_per_step):
      return
    steps, seconds = step - last[0], now - last[1]
    if steps > 0 and seconds > 0:
      self._tb.add_scalar(THROUGHPUT_TAG,
                          steps * self._images_per_step / seconds, step)

  def flush(self) -> None:
    """Flushes what the TensorBoard thread has written (JSONL lines are
    flushed as written; :meth:`close` writes out every pending event)."""
    if self._tb is not None:
      self._tb.flush()

  def close(self) -> None:
    """Writes out every pending event and closes both writers; further
    closes are no-ops."""
    if self._jsonl is not None:
      self._jsonl.close()
      self._jsonl = None
    if self._tb is not None:
      self._tb.close()
      self._tb = None

  def __enter__(self) -> "MetricWriter":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def _batch_size(config_text: str) -> int | None:
  try:
    size = json.loads(config_text).get("batch_size")
  except (json.JSONDecodeError, AttributeError):
    return None
  return size if isinstance(size, int) and size > 0 else None


def _as_markdown(text: str) -> str:
  # TensorBoard renders text as markdown: indented, it is a code block.
  return "\n".join("    " + line for line in text.splitlines())
