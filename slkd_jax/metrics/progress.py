"""Training progress on the terminal or in a log file (``tqdm``)."""

from __future__ import annotations

import contextlib
import sys
from typing import Any, TextIO

import tqdm

from slkd_jax.metrics.values import to_python


class _Discard:
  """A text sink: tqdm keeps counting and timing, nothing is drawn."""

  def write(self, text: str) -> int:
    return len(text)

  def flush(self) -> None:
    pass


class ProgressBar:
  """Training progress through ``tqdm``: ``desc: step/total percent
  [elapsed<ETA, steps/s, images/s=..., values]``.

  On a TTY tqdm redraws the line in place (at most every ``min_interval``
  seconds). Elsewhere (log files, CI, SLURM) tqdm draws nothing and a plain
  line is printed at the first update (the first log window: the run is
  seen to be moving) and each time another 10% of the steps is done, so
  logs stay short and free of carriage returns. Rates are tqdm's moving averages
  (``smoothing``), so the first interval (XLA compilation) fades out.
  """

  def __init__(self, total_steps: int, desc: str = "", enabled: bool = True,
               stream: TextIO | None = None, *, initial_step: int = 0,
               min_interval: float = 0.1, smoothing: float = 0.3):
    """``initial_step`` is where a resumed run starts counting from;
    ``enabled=False`` (non-main processes) shows nothing."""
    self.total_steps = int(total_steps)
    # Looked up here, not in the signature, so a sys.stderr replaced after
    # import (pytest capture, redirection) is honoured.
    self.stream = sys.stderr if stream is None else stream
    try:
      self._tty = bool(self.stream.isatty())
    except (AttributeError, ValueError):
      self._tty = False
    self._bar = None
    if not enabled:
      return
    plain = (f"{desc}: " if desc else "") + (
        "{n_fmt}/{total_fmt} {percentage:3.0f}% "
        "[{elapsed}<{remaining}, {rate_fmt}{postfix}]")
    self._bar = tqdm.tqdm(
        total=self.total_steps, initial=int(initial_step), desc=desc or None,
        unit="step", file=self.stream if self._tty else _Discard(),
        # tqdm measures the rate when it redraws: off a TTY, where drawing
        # costs nothing, at every update.
        mininterval=min_interval if self._tty else 0.0, miniters=1,
        smoothing=smoothing, dynamic_ncols=True,
        bar_format=None if self._tty else plain)
    self._next_decile = self._decile(int(initial_step)) + 1
    self._printed_step: int | None = None

  def _decile(self, step: int) -> int:
    return int(10 * step / self.total_steps) if self.total_steps > 0 else 10

  def update(self, step: int, images_per_step: int = 0, **values: Any) -> None:
    """Reports that ``step`` steps are done, each of ``images_per_step``.

    ``values`` (e.g. ``loss=..., ce=...``) are shown as ``key=value``; pass
    host floats (a device array here forces a device sync).
    """
    if self._bar is None:
      return
    values = {k: to_python(v) for k, v in values.items()}
    self._set_postfix(images_per_step, values)
    self._bar.update(int(step) - self._bar.n)
    # Again with the rate this update measured (a TTY redraw above showed
    # the previous one).
    self._set_postfix(images_per_step, values)
    if not self._tty and (self._printed_step is None
                          or self._decile(self._bar.n) >= self._next_decile
                          or self._bar.n >= self.total_steps):
      self._next_decile = self._decile(self._bar.n) + 1
      self._print_line()

  @contextlib.contextmanager
  def above(self):
    """Log lines written in this block go above the bar: on a TTY the bar is
    cleared first and redrawn after, so no line is glued onto it."""
    drawn = self._bar is not None and self._tty
    if drawn:
      self._bar.clear()
    try:
      yield
    finally:
      if drawn and self._bar is not None:
        self._bar.refresh()

  def _set_postfix(self, images_per_step: int, values: dict) -> None:
    """Shows images/s (tqdm's smoothed steps/s times ``images_per_step``;
    its overall average before the first) and ``values``."""
    info = self._bar.format_dict
    steps_per_s = info["rate"] or (
        (info["n"] - info["initial"]) / info["elapsed"]
        if info["elapsed"] > 0 else 0.0)
    if steps_per_s * images_per_step > 0:
      values = {"images/s": f"{steps_per_s * images_per_step:,.0f}", **values}
    self._bar.set_postfix(values, refresh=False)

  def _print_line(self) -> None:
    if self._printed_step != self._bar.n:
      self.stream.write(str(self._bar) + "\n")
      self.stream.flush()
      self._printed_step = self._bar.n

  def close(self) -> None:
    """Shows the final state and ends the line; further closes are no-ops."""
    if self._bar is None:
      return
    if not self._tty:
      self._print_line()
    self._bar.close()
    self._bar = None

  def __enter__(self) -> "ProgressBar":
    return self

  def __exit__(self, *exc) -> None:
    self.close()
