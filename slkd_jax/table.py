"""One command for a paper table: pairs × rows × seeds → ``table.md``.

  python -m slkd_jax.table --config=configs/tables/digits.py --workdir=DIR
  python -m slkd_jax.table --config=configs/tables/slkd_table1.py \\
      --workdir=DIR --dry_run [--nomeasure]

A table config (``configs/tables/*.py``) names a preset file (``presets``:
any config file whose ``get_config('PAIR,METHOD')`` builds a run, such as
``configs/cifar100.py``), the ``pairs`` (columns), the ``rows`` (methods,
or ``variants``: a method with config overrides, such as SLKD with K = 3),
the ``seeds`` and ``overrides`` applied to every run. Each (row, pair, seed)
is one run of ``slkd_jax.train`` in ``DIR/runs/<pair>/<row>/seed_<s>``; the
teacher of every architecture is trained once in ``DIR/teachers/<arch>``
(or taken from ``teachers``: converted checkpoints) and shared by every run
that distils from it. Finished runs are skipped, unfinished ones resume
(``train.run`` resumes from the latest checkpoint), so the command can be
stopped (SIGTERM/SIGINT: exit 75) and rerun at any point without losing
work. After every cell it rewrites ``DIR/table.md`` (rows = rows, columns =
pairs, mean ± std of the best-epoch top-1 over the finished seeds, the
paper's number and the difference, links to the runs; then the same for the
last epoch), ``table.csv`` and ``table.json`` (every run's numbers), and
prints a progress line over the whole table. A run that diverges is
frozen (the cell's other seeds go on), marked in ``table.csv`` and left
out of its cell's mean.

Several jobs share one table with ``--shard=I/N`` (job I of N, counted from
0, e.g. a Slurm array's ``$SLURM_ARRAY_TASK_ID``), all with the same
``--workdir`` on a shared filesystem: job I trains cells I, I+N, I+2N, ...
of the table (rows × pairs order). A teacher several jobs need is trained
once, by the first job that claims it (:class:`TeacherClaims`); the others
train their other cells meanwhile, then wait for it. Each job rewrites the
outputs from every finished run; run once more without ``--shard`` (or
with ``--dry_run``) after the jobs end to gather the final ``table.md``.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import importlib.util
import io
import json
import os
import socket
import threading
import time
import uuid
from typing import Any, Callable, Sequence

import ml_collections

from slkd_jax import config as config_lib
from slkd_jax import config_checks
from slkd_jax import errors, metrics, methods

#: Training-set sizes (images one epoch trains on), for the estimates.
TRAIN_EXAMPLES = {"cifar100": 50_000, "imagenet2012": 1_281_167,
                  "digits": 1_437}


@dataclasses.dataclass(frozen=True)
class Run:
  """One run of the table: ``row`` (its label) on ``pair`` with ``seed``."""
  row: str
  method: str
  pair: str
  seed: int
  config: ml_collections.ConfigDict
  workdir: str  # the run's own (a study's runs/<i>)
  paper: float | None
  cell_dir: str  # the cell's study (one_program), else the run's workdir


def table_config(*, title: str, presets: str, pairs: Sequence[str],
                 rows: Sequence[str], seeds: Sequence[int] = (0, 1, 2),
                 variants: dict | None = None, overrides: dict | None = None,
                 teachers: dict | None = None, teacher_seed: int = 0,
                 one_program: bool = True) -> ml_collections.ConfigDict:
  """A table config (what ``configs/tables/*.py`` return).

  Args:
    title: the heading of ``table.md``.
    presets: the preset file whose ``get_config('PAIR,METHOD')`` builds a
      run (and whose ``paper_top1(pair, method)``, if any, gives the
      paper's numbers).
    pairs: the columns (preset names).
    rows: method names or keys of ``variants``.
    seeds: every cell's seeds.
    variants: ``{label: {'method': m, 'overrides': {...}, 'paper': {pair:
      top-1}}}``: a row that runs ``m`` with config overrides.
    overrides: nested config values set on every run (and teacher).
    teachers: teacher architecture → checkpoint, instead of training it.
    teacher_seed: the seed of the teachers the table trains.
    one_program: train each cell's seeds together, as one study (one
      compiled program, the batch and the teacher's forward pass shared);
      False: one run after the other.
  """
  return ml_collections.ConfigDict({
      "title": title, "presets": presets, "pairs": tuple(pairs),
      "rows": tuple(rows), "seeds": tuple(seeds), "variants": variants or {},
      "overrides": overrides or {}, "teachers": teachers or {},
      "teacher_seed": teacher_seed, "one_program": one_program})


def load_presets(path: str):
  """The preset module at ``path`` (a ``configs/*.py`` file)."""
  if not os.path.isfile(path):
    raise errors.ConfigError(f"presets={path!r}: no such file (give a "
                             f"config file such as configs/cifar100.py)")
  spec = importlib.util.spec_from_file_location(
      f"slkd_table_presets_{abs(hash(os.path.abspath(path)))}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def apply_overrides(config: ml_collections.ConfigDict, overrides: dict,
                    where: str) -> None:
  """Set nested ``overrides`` (``{'teacher': {'num_epochs': 1}}``) on
  ``config``; an unknown key is a :class:`~slkd_jax.errors.ConfigError`."""
  for key, value in overrides.items():
    if key not in config:
      raise errors.ConfigError(
          f"{where}: the run config has no key {key!r}"
          f"{config_lib.did_you_mean(key, list(config.keys()))}")
    if isinstance(value, (dict, ml_collections.ConfigDict)):
      apply_overrides(config[key], dict(value), f"{where}.{key}")
    else:
      config[key] = value


def _row(spec, label: str) -> tuple[str, dict, dict]:
  """``(method, overrides, paper numbers by pair)`` of row ``label``."""
  variants = spec.get("variants", {}) or {}
  if label in variants:
    variant = variants[label]
    return (variant["method"], dict(variant.get("overrides", {}) or {}),
            dict(variant.get("paper", {}) or {}))
  if label not in methods.METHODS:
    raise errors.ConfigError(
        f"rows: {label!r} is neither a method nor a key of variants"
        f"{config_lib.did_you_mean(label, [*methods.METHODS, *variants])}")
  return label, {}, {}


def plan(spec, workdir: str) -> list[Run]:
  """Every run of the table, its config built and validated (nothing
  trains): rows × pairs × seeds, in that order."""
  presets = load_presets(spec.presets)
  paper_top1 = getattr(presets, "paper_top1", None)
  runs = []
  for label in spec.rows:
    method, row_overrides, row_paper = _row(spec, label)
    for pair in spec.pairs:
      paper = row_paper.get(pair)
      if paper is None and paper_top1 is not None:
        paper = paper_top1(pair, method)
      cell_dir = os.path.join(workdir, "runs", pair, label)
      for i, seed in enumerate(spec.seeds):
        c = presets.get_config(f"{pair},{method}")
        c.compare_with = ()
        apply_overrides(c, dict(spec.get("overrides", {}) or {}), "overrides")
        apply_overrides(c, row_overrides, f"variants.{label}.overrides")
        c.seed = int(seed)
        config_checks.validate(c)
        if runs_as_studies(spec):
          run_dir = os.path.join(cell_dir, "runs", str(i))
        else:
          run_dir = cell_dir = os.path.join(workdir, "runs", pair, label,
                                            f"seed_{seed}")
        runs.append(Run(label, method, pair, int(seed), c, run_dir, paper,
                        cell_dir))
  return runs


def runs_as_studies(spec) -> bool:
  """Whether the table trains each cell's seeds as one study."""
  return bool(spec.get("one_program", True))


def cells_of(runs: Sequence[Run]) -> dict[str, list[int]]:
  """The runs (indices) of each cell's study directory, in table order."""
  cells: dict[str, list[int]] = {}
  for i, run in enumerate(runs):
    cells.setdefault(run.cell_dir, []).append(i)
  return cells


def study_config(runs: Sequence[Run]) -> ml_collections.ConfigDict:
  """The config of a cell trained as one study: its first run's, with
  every run's seed in ``study.seeds``."""
  c = runs[0].config.copy_and_resolve_references()
  c.study.seeds = tuple(run.seed for run in runs)
  config_checks.validate(c)
  return c


def attach_teachers(spec, runs: Sequence[Run], workdir: str
                    ) -> dict[str, ml_collections.ConfigDict]:
  """Point every run that distils at its teacher: ``spec.teachers[arch]``
  (a converted or earlier checkpoint) or the table's own, trained once per
  architecture in ``DIR/teachers/<arch>`` (its ``ce/final_model``) with
  the teacher recipe of the first run that needs it and ``teacher_seed``.
  Returns the teachers' training configs by workdir."""
  given = dict(spec.get("teachers", {}) or {})
  to_train = {}
  for run in runs:
    if (not methods.get(run.method).uses_teacher
        or run.config.teacher.checkpoint is not None):
      continue
    arch = run.config.teacher.arch
    if arch in given:
      run.config.teacher.checkpoint = given[arch]
      continue
    teacher_dir = os.path.join(workdir, "teachers", arch)
    if teacher_dir not in to_train:
      c = config_lib.stage_config(run.config, config_lib.TEACHER_STAGE)
      c.seed = int(spec.get("teacher_seed", 0))
      to_train[teacher_dir] = c
    run.config.teacher.checkpoint = os.path.join(teacher_dir, "ce",
                                                 "final_model")
  return to_train


def stage_result(workdir: str, stage: str):
  """The finished :class:`slkd_jax.report.StageRun` of ``stage`` in
  ``workdir``, or None."""
  from slkd_jax import report
  for stage_run in report.load_runs([workdir]):
    if stage_run.stage == stage and stage_run.finished:
      return stage_run
  return None


def diverged(run: Run) -> str | None:
  """``'diverged at step N (terms)'`` when the run's study froze it."""
  if run.cell_dir == run.workdir:
    return None
  try:
    with open(os.path.join(run.cell_dir, run.method, "study.json")) as f:
      status = json.load(f)["runs"][int(os.path.basename(run.workdir))][
          "status"]
  except FileNotFoundError:
    return None
  return None if status == "done" else status


def run_numbers(run: Run) -> dict[str, Any]:
  """One run's record for ``table.csv`` / ``table.json`` (best and last
  top-1 None until it is finished; ``diverged``: why it never will)."""
  done = stage_result(run.workdir, run.method)
  record = {"row": run.row, "method": run.method, "pair": run.pair,
            "seed": run.seed, "workdir": run.workdir, "paper": run.paper,
            "finished": done is not None, "diverged": diverged(run),
            "best_top1": None, "best_epoch": None, "last_top1": None}
  if done is not None:
    best, best_epoch, last = metrics.best_and_last(done.result,
                                                   "student/top1")
    record.update(best_top1=best, best_epoch=best_epoch, last_top1=last)
  return record


# ---------------------------------------------------------------------------
# table.md / table.csv / table.json


def _cell(values: list[float], seeds: int, paper: float | None) -> str:
  """``mean ± std (n/seeds) · paper P (Δ)`` for one cell."""
  if not values:
    return "—"
  text = metrics.mean_std(values) if len(values) > 1 else f"{values[0]:.2f}"
  if len(values) < seeds:
    text += f" ({len(values)}/{seeds})"
  if paper is not None:
    diff = sum(values) / len(values) - paper
    text += f" · paper {paper:.2f} ({diff:+.2f})"
  return text


def render(spec, records: Sequence[dict], key: str, workdir: str) -> str:
  """A markdown table of ``key`` (``best_top1`` / ``last_top1``): rows ×
  pairs, each cell mean ± std over its finished seeds, the paper's number
  and our difference, and links to its runs."""
  seeds = len(spec.seeds)
  lines = ["| row | " + " | ".join(spec.pairs) + " |",
           "|---|" + "---|" * len(spec.pairs)]
  for label in spec.rows:
    cells = []
    for pair in spec.pairs:
      mine = [r for r in records if r["row"] == label and r["pair"] == pair]
      values = [r[key] for r in mine if r[key] is not None]
      links = " ".join(
          f"[{r['seed']}]({os.path.relpath(r['workdir'], workdir)})"
          for r in mine if r["finished"])
      paper = mine[0]["paper"] if mine else None
      lost = sum(1 for r in mine if r.get("diverged"))
      cells.append(_cell(values, seeds, paper)
                   + (f" ({lost} diverged)" if lost else "")
                   + (f" {links}" if links else ""))
    lines.append(f"| {label} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def write_outputs(spec, records: Sequence[dict], workdir: str) -> None:
  """``table.md``, ``table.csv`` and ``table.json`` in ``workdir``."""
  seeds = ", ".join(str(s) for s in spec.seeds)
  text = [f"# {spec.get('title', 'Table')}", "",
          f"Top-1 (%) on the test split, mean ± std (sample std) over seeds "
          f"{seeds}; the paper's number and our mean's difference where it "
          f"reports one; [s] links each finished run.", "",
          "## Best epoch (the mdistiller / SLKD convention)", "",
          render(spec, records, "best_top1", workdir), "",
          "## Last epoch", "", render(spec, records, "last_top1", workdir), ""]
  _write_atomic(os.path.join(workdir, "table.md"), "\n".join(text))
  _write_atomic(os.path.join(workdir, "table.json"),
                json.dumps(list(records), indent=2))
  text = io.StringIO()
  writer = csv.DictWriter(text, fieldnames=list(records[0]))
  writer.writeheader()
  writer.writerows(records)
  _write_atomic(os.path.join(workdir, "table.csv"), text.getvalue())


def _write_atomic(path: str, text: str) -> None:
  """Replace ``path`` whole: jobs sharing the workdir each write their own
  temporary file (host and pid in its name), the last replace wins."""
  tmp = f"{path}.{socket.gethostname()}.{os.getpid()}.tmp"
  with open(tmp, "w", newline="") as f:
    f.write(text)
  os.replace(tmp, path)


# ---------------------------------------------------------------------------
# Sharding: several jobs share one table (and its workdir).

#: A job refreshes the claim of the teacher it trains this often ...
HEARTBEAT_SECONDS = 60.0
#: ... and another job takes over a claim untouched this long (its job died).
STALE_SECONDS = 15 * 60.0
#: How often a job whose cells wait for another job's teacher looks again.
POLL_SECONDS = 60.0


@dataclasses.dataclass(frozen=True)
class Shard:
  """Job ``index`` of ``count`` jobs (0-based) that share one table."""
  index: int = 0
  count: int = 1

  def __str__(self) -> str:
    return f"{self.index}/{self.count}"


def parse_shard(text: str | None) -> Shard | None:
  """``'I/N'`` (job I of N, counted from 0: ``0/4`` ... ``3/4``) → a
  :class:`Shard`; None → None. Anything else is a ConfigError."""
  if text is None:
    return None
  index, sep, count = str(text).partition("/")
  try:
    shard = Shard(int(index), int(count)) if sep else None
  except ValueError:
    shard = None
  if shard is None or not 0 <= shard.index < shard.count:
    raise errors.ConfigError(
        f"--shard={text}: give I/N, job I of N counted from 0 (0/4 ... 3/4; "
        f"in a Slurm array --array=0-3: --shard=$SLURM_ARRAY_TASK_ID/4)")
  return shard


def shard_cells(runs: Sequence[Run], shard: Shard) -> dict[str, list[int]]:
  """The cells (as :func:`cells_of`) job ``shard`` trains: every
  ``shard.count``-th cell in table order from cell ``shard.index``, so the
  jobs' shares are disjoint and together the whole table."""
  return dict(list(cells_of(runs).items())[shard.index::shard.count])


def teacher_dir_of(run: Run, teachers: dict) -> str | None:
  """The table-trained teacher (a key of :func:`attach_teachers`' result)
  that ``run`` distils from; None for a given teacher or none."""
  for teacher_dir in teachers:
    if run.config.teacher.checkpoint == os.path.join(teacher_dir, "ce",
                                                     "final_model"):
      return teacher_dir
  return None


class TeacherClaims:
  """Which job trains each of the table's own teachers.

  Jobs of one table share its teachers through the workdir, and a job
  trains a teacher only while it holds the teacher's claim,
  ``DIR/teachers/<arch>.claim``: a file created exclusively (of two jobs
  that try at once, one wins) that names the job's shard and is touched
  every :data:`HEARTBEAT_SECONDS` while the job trains. A job that needs a
  teacher another job holds trains its other cells first, then waits. A
  claim is taken over when it names the job's own shard (a requeued job:
  one shard index runs as one job at a time) or is stale (untouched for
  :data:`STALE_SECONDS`: its job died); a job stopped by SIGTERM/SIGINT or
  an error releases its claim, so a waiting job goes on at once.
  """

  def __init__(self, owner: str):
    self.owner = owner

  def holder(self, teacher_dir: str) -> str | None:
    """The shard holding ``teacher_dir``'s claim ('' while it is being
    written), or None."""
    try:
      with open(teacher_dir + ".claim") as f:
        return f.read().strip()
    except FileNotFoundError:
      return None

  def acquire(self, teacher_dir: str) -> bool:
    """Claim ``teacher_dir`` for this job; False while another job holds
    a live claim."""
    path = teacher_dir + ".claim"
    os.makedirs(os.path.dirname(path), exist_ok=True)
    for _ in range(3):  # a claim released or broken meanwhile: try again
      try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
      except FileExistsError:
        holder = self.holder(teacher_dir)
        if holder == self.owner:
          os.utime(path)
          return True
        if holder is not None and not self._break_if_stale(path):
          return False
        continue
      with os.fdopen(fd, "w") as f:
        f.write(self.owner + "\n")
      return True
    return False

  def _break_if_stale(self, path: str) -> bool:
    """Remove the claim at ``path`` if it is stale; whether it is gone."""
    try:
      seen = os.stat(path)
      if time.time() - seen.st_mtime <= STALE_SECONDS:
        return False
      aside = f"{path}.{uuid.uuid4().hex}.stale"
      os.rename(path, aside)  # of two jobs breaking it, one renames it
    except FileNotFoundError:
      return True
    if os.stat(aside).st_ino != seen.st_ino:  # a fresh claim: put it back
      try:
        os.link(aside, path)
      except FileExistsError:
        pass
    os.unlink(aside)
    return True

  def release(self, teacher_dir: str) -> None:
    if self.holder(teacher_dir) == self.owner:
      try:
        os.unlink(teacher_dir + ".claim")
      except FileNotFoundError:
        pass

  @contextlib.contextmanager
  def heartbeat(self, teacher_dir: str):
    """Touch the claim every :data:`HEARTBEAT_SECONDS` while in the block."""
    stop = threading.Event()

    def beat():
      while not stop.wait(HEARTBEAT_SECONDS):
        try:
          os.utime(teacher_dir + ".claim")
        except OSError:
          pass  # released or broken: acquire() sorts it out

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
      yield
    finally:
      stop.set()
      thread.join()


# ---------------------------------------------------------------------------
# Running the table.


def images_of(config) -> int:
  """Training images one run processes (epochs × training-set size)."""
  name = config.data.name
  n = config.data.num_train if name == "synthetic" else TRAIN_EXAMPLES[name]
  return int(n) * int(config.num_epochs)


class Progress:
  """The progress line over the whole table: runs done, images/s of this
  session's training, ETA of the rest."""

  def __init__(self, total_runs: int, total_images: int,
               out: Callable[[str], None]):
    self.total_runs, self.images_left = total_runs, total_images
    self.done, self.images, self.seconds = 0, 0, 0.0
    self.out = out

  def skip(self, images: int, runs: int = 1) -> None:
    """``runs`` runs of ``images`` each are done (or were already)."""
    self.done += runs
    self.images_left -= images * runs

  def trained(self, images: int, seconds: float, what: str,
              runs: int = 1) -> None:
    """``images`` in all were trained in ``seconds`` (``runs`` runs)."""
    self.skip(images // runs, runs)
    self.images += images
    self.seconds += seconds
    rate = self.images / max(self.seconds, 1e-9)
    eta = self.images_left / rate if rate else 0.0
    self.out(f"table: {self.done}/{self.total_runs} runs done ({what} "
             f"{_duration(seconds)}); {rate:,.0f} images/s; ETA "
             f"{_duration(eta)}")


def _duration(seconds: float) -> str:
  minutes, secs = divmod(int(round(seconds)), 60)
  hours, minutes = divmod(minutes, 60)
  return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def run_table(spec, workdir: str, out: Callable[[str], None] = print,
              shard: Shard | None = None) -> list[dict]:
  """Train this job's unfinished cells (``shard``: its share of the table,
  :func:`shard_cells`; None: every cell), each after the table-trained
  teacher it distils from (trained once, by whichever job claims it first:
  :class:`TeacherClaims`). After every cell it rewrites the outputs from
  every finished run of the table, this job's or another's. Returns every
  run's record."""
  from slkd_jax import train  # noqa: PLC0415 (jax only when training)
  os.makedirs(workdir, exist_ok=True)
  return _Job(spec, workdir, shard or Shard(), out, train).run()


class _Job:
  """One job's share of a table (see :func:`run_table`)."""

  def __init__(self, spec, workdir: str, shard: Shard, out, train):
    self.spec, self.workdir, self.shard = spec, workdir, shard
    self.out, self.train = out, train
    self.runs = plan(spec, workdir)
    self.teachers = attach_teachers(spec, self.runs, workdir)
    self.cells = shard_cells(self.runs, shard)
    self.teacher_of = {cell: teacher_dir_of(self.runs[members[0]],
                                            self.teachers)
                       for cell, members in self.cells.items()}
    mine = [t for t in self.teachers if t in self.teacher_of.values()]
    self.claims = TeacherClaims(str(shard))
    self.ready: set[str] = set()  # teachers known trained (and counted)
    self.waiting_for: list[str] = []
    self.records = [run_numbers(r) for r in self.runs]
    self.progress = Progress(
        len(mine) + sum(len(m) for m in self.cells.values()),
        sum(images_of(self.teachers[t]) for t in mine)
        + sum(images_of(self.runs[i].config) for m in self.cells.values()
              for i in m), out)
    self.my_teachers = mine

  def run(self) -> list[dict]:
    for teacher_dir in self.my_teachers:  # the teachers first, if free
      self.teacher_ready(teacher_dir)
    pending = [cell for cell in self.cells if not self.cell_done(cell)]
    while pending:
      ready = [c for c in pending if self.teacher_ready(self.teacher_of[c])]
      for cell in ready:
        self.train_cell(cell)
        pending.remove(cell)
      if pending and not ready:
        self.wait_for_teachers(pending)
    self.write()
    self.out(self.summary())
    return self.records

  def teacher_ready(self, teacher_dir: str | None) -> bool:
    """Whether ``teacher_dir`` (None: no table-trained teacher) is trained,
    training it now when no other job holds its claim."""
    if teacher_dir is None or teacher_dir in self.ready:
      return True
    config = self.teachers[teacher_dir]
    if stage_result(teacher_dir, "ce") is None:
      if not self.claims.acquire(teacher_dir):
        return False
      try:  # its last holder may have finished it before letting go
        if stage_result(teacher_dir, "ce") is None:
          with self.claims.heartbeat(teacher_dir):
            _train(self.train, config, teacher_dir, self.progress, 1,
                   f"teacher {config.student.arch}")
          self.ready.add(teacher_dir)
      finally:
        self.claims.release(teacher_dir)
    if teacher_dir not in self.ready:  # trained before: counted as done
      self.ready.add(teacher_dir)
      self.progress.skip(images_of(config))
    return True

  def cell_done(self, cell_dir: str) -> bool:
    members = self.cells[cell_dir]
    done = all(self.records[i]["finished"] or self.records[i]["diverged"]
               for i in members)
    if done:
      self.progress.skip(images_of(self.runs[members[0]].config),
                         len(members))
    return done

  def train_cell(self, cell_dir: str) -> None:
    cell = [self.runs[i] for i in self.cells[cell_dir]]
    config = (study_config(cell) if runs_as_studies(self.spec)
              else cell[0].config)
    seeds = ", ".join(str(run.seed) for run in cell)
    _train(self.train, config, cell_dir, self.progress, len(cell),
           f"{cell[0].row} on {cell[0].pair}, seed{'s' * (len(cell) > 1)} "
           f"{seeds}")
    self.write()

  def write(self) -> None:
    """The outputs from every finished run (other jobs' too: a finished
    run's record is final, the others are read again)."""
    self.records = [record if record["finished"] else run_numbers(run)
                    for record, run in zip(self.records, self.runs)]
    write_outputs(self.spec, self.records, self.workdir)

  def wait_for_teachers(self, pending: Sequence[str]) -> None:
    needed = sorted({self.teacher_of[cell] for cell in pending})
    if needed != self.waiting_for:
      self.waiting_for = needed
      held = ", ".join(f"{os.path.basename(t)} (claimed by job "
                       f"{self.claims.holder(t) or '?'})" for t in needed)
      self.out(f"table: shard {self.shard}: {len(pending)} cell(s) wait for "
               f"teachers other jobs train: {held}; looking again every "
               f"{POLL_SECONDS:g} s (a claim untouched for "
               f"{STALE_SECONDS:g} s is taken over)")
    _sleep_unless_stopped(POLL_SECONDS)

  def summary(self) -> str:
    path = os.path.join(self.workdir, "table.md")
    if self.shard.count == 1:
      return f"table: all {len(self.runs)} runs finished; {path}"
    done = sum(bool(r["finished"] or r["diverged"]) for r in self.records)
    mine = sum(len(m) for m in self.cells.values())
    return (f"table: shard {self.shard}: its {mine} runs finished; {done}/"
            f"{len(self.runs)} runs of the table are; once every job has "
            f"ended, rerun without --shard (or with --dry_run) to gather "
            f"them in {path}")


def _sleep_unless_stopped(seconds: float) -> None:
  """Sleep; SIGTERM/SIGINT meanwhile raises ``Preempted`` (exit 75: the
  scheduler requeues the job, nothing to save)."""
  from slkd_jax import preemption  # noqa: PLC0415
  stop = preemption.StopSignal().install()
  deadline = time.monotonic() + seconds
  while time.monotonic() < deadline:
    if stop.requested:
      raise preemption.Preempted("stopped while waiting for a teacher; "
                                 "rerun the command to go on")
    time.sleep(min(1.0, max(deadline - time.monotonic(), 0.0)))


def _train(train, config, workdir: str, progress: Progress, runs: int,
           what: str) -> None:
  """Train ``config`` (``runs`` runs) in ``workdir``, timed."""
  start = time.perf_counter()
  train.run(config, workdir)
  progress.trained(images_of(config) * runs, time.perf_counter() - start,
                   what, runs)


# ---------------------------------------------------------------------------
# --dry-run


def measure_images_per_second(config, runs: int = 1, steps: int = 2
                              ) -> float:
  """Training images/s of each of ``runs`` runs of ``config``'s method
  trained together as one study (one run: the plain step) on this machine:
  the jitted step (random teacher, a random batch of the run's shape),
  compiled once, then timed over ``steps`` steps."""
  import jax  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415
  from slkd_jax import parallel, studies  # noqa: PLC0415
  from slkd_jax import stage as stage_lib  # noqa: PLC0415
  from slkd_jax import state as state_lib  # noqa: PLC0415
  c = config_lib.stage_config(config, config.method)
  stage = stage_lib.resolve(c)
  mesh = parallel.make_mesh()
  teacher = None
  if stage.nets.teacher is not None:
    params, stats = state_lib.init_variables(stage.nets.teacher,
                                             jax.random.key(0),
                                             stage.image_shape)
    teacher = jax.device_put(state_lib.ModelState(params, stats),
                             parallel.replicated(mesh))
  n = TRAIN_EXAMPLES.get(c.data.name, c.data.num_train)
  rng = np.random.default_rng(0)
  labels = rng.integers(0, c.data.num_classes, n).astype(np.int32)
  b = c.batch_size
  batch = jax.device_put({
      "image": rng.standard_normal((b, *stage.image_shape), np.float32),
      "label": labels[:b], "mask": np.ones(b, bool),
      "index": np.arange(b, dtype=np.int32)}, parallel.batch_sharding(mesh))
  # The program the loop runs: R runs in one step (a single run: R = 1).
  state = studies.create_runs_state(stage, mesh, range(runs), labels)
  step = studies.make_runs_step(
      stage, mesh, (c.study.impl or c.slkd.ensemble) if runs > 1
      else "unrolled", freeze=runs > 1)
  teacher = teacher if stage.method.uses_teacher else None
  hps, alive = (studies.stack([stage.hparams(1)] * runs),
                studies.all_alive(runs, mesh))
  advance = lambda s: step(s, alive, teacher, batch, hps)[::2]  # noqa: E731
  state, m = advance(state)
  jax.block_until_ready(m)
  start = time.perf_counter()
  for _ in range(steps):
    state, m = advance(state)
  jax.block_until_ready(m)
  return steps * b / (time.perf_counter() - start)


def dry_run(spec, workdir: str, measure: bool,
            out: Callable[[str], None] = print,
            shard: Shard | None = None) -> list[dict]:
  """Print every cell (row × pair: seeds, the paper's number, images per
  run and, with ``measure``, the time per run from a short measured step)
  and the totals, of job ``shard``'s share (None: the whole table); nothing
  trains. When ``workdir`` holds runs, it also rewrites the outputs from
  every finished run (gathering what sharded jobs trained)."""
  runs = plan(spec, workdir)
  teachers = attach_teachers(spec, runs, workdir)
  share = {i for members in shard_cells(runs, shard or Shard()).values()
           for i in members}
  cells = []
  for label in spec.rows:
    for pair in spec.pairs:
      mine = [r for i, r in enumerate(runs)
              if r.row == label and r.pair == pair and i in share]
      if not mine:
        continue
      images = images_of(mine[0].config)
      together = len(mine) if runs_as_studies(spec) else 1
      # A study's runs advance together: its time, shared by its runs.
      seconds = (images / measure_images_per_second(mine[0].config, together)
                 / together if measure else None)
      cells.append({"row": label, "pair": pair, "method": mine[0].method,
                    "runs": len(mine), "paper": mine[0].paper,
                    "images_per_run": images, "seconds_per_run": seconds})
  out(metrics.summary_table(
      [{**c, "paper": "-" if c["paper"] is None else f"{c['paper']:.2f}",
        "images/run": f"{c['images_per_run']:,}",
        "time/run": ("-" if c["seconds_per_run"] is None
                     else _duration(c["seconds_per_run"]))} for c in cells],
      ["row", "pair", "method", "runs", "paper", "images/run", "time/run"]))
  needed = {teacher_dir_of(runs[i], teachers) for i in share}
  out((f"shard {shard}: " if shard else "")
      + _totals(cells, [t for t in teachers if t in needed], measure))
  if os.path.isdir(os.path.join(workdir, "runs")):
    out(gather(spec, runs, workdir))
  return cells


def gather(spec, runs: Sequence[Run], workdir: str) -> str:
  """Rewrite the outputs from every finished run; a line saying so."""
  records = [run_numbers(run) for run in runs]
  write_outputs(spec, records, workdir)
  done = sum(bool(r["finished"]) for r in records)
  return (f"table: {done}/{len(records)} runs finished; "
          f"{os.path.join(workdir, 'table.md')} rewritten from them")


def _totals(cells: Sequence[dict], teachers: Sequence[str],
            measure: bool) -> str:
  runs = sum(c["runs"] for c in cells)
  images = sum(c["images_per_run"] * c["runs"] for c in cells)
  own = ", ".join(sorted(os.path.basename(t) for t in teachers)) or "none"
  line = (f"{len(cells)} cells, {runs} runs, {len(teachers)} teacher(s) of "
          f"the table's own ({own}); {images:,} training images")
  if measure:
    seconds = sum(c["seconds_per_run"] * c["runs"] for c in cells)
    line += (f", about {_duration(seconds)} of distillation (teachers not "
             f"included)")
  return line


PROG = "python -m slkd_jax.table"


def define_flags(fv, argv: Sequence[str]) -> None:
  """The flags of ``python -m slkd_jax.table``."""
  from absl import flags  # noqa: PLC0415
  from ml_collections import config_flags  # noqa: PLC0415
  config_flags.DEFINE_config_file(
      "config", None, "A table config, e.g. configs/tables/digits.py",
      flag_values=fv, sys_argv=list(argv))
  flags.DEFINE_string("workdir", None, "Where the runs and table.md go; "
                      "rerun to resume.", flag_values=fv)
  flags.DEFINE_bool("dry_run", False, "List the cells, runs, images and "
                    "estimated time; train nothing.", flag_values=fv)
  flags.DEFINE_bool("measure", True, "With --dry_run: time one step per cell "
                    "(compiles each).", flag_values=fv)
  flags.DEFINE_string("shard", None, "I/N: run only job I's share of N jobs "
                      "(counted from 0); see README, 'Paper tables'.",
                      flag_values=fv)


def run_command(fv, positional: list[str]) -> None:
  """Train (or with ``--dry_run`` list) the table of ``--config``."""
  from slkd_jax import cli, parallel  # noqa: PLC0415
  cli.unexpected(positional)
  spec = cli.config_value(fv["config"])
  if spec is None or fv.workdir is None:
    raise errors.ConfigError("--config and --workdir are required")
  parallel.configure_jax(plan(spec, fv.workdir)[0].config)
  shard = parse_shard(fv.shard)
  if fv.dry_run:
    dry_run(spec, fv.workdir, fv.measure, shard=shard)
  else:
    run_table(spec, fv.workdir, shard=shard)


def main(argv: Sequence[str] | None = None) -> int:
  """``python -m slkd_jax.table``; ``argv``: the arguments after the
  program name (default ``sys.argv[1:]``). Returns the exit status
  (:mod:`slkd_jax.cli`: 0, 2 with one line, 75 when stopped)."""
  from slkd_jax import cli  # noqa: PLC0415
  return cli.run(define_flags, run_command, argv, prog=PROG, doc=__doc__,
                 output=lambda fv: fv.workdir)


if __name__ == "__main__":
  from slkd_jax import cli
  cli.start(main)
