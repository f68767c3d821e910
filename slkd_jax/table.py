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
"""

from __future__ import annotations

import csv
import dataclasses
import importlib.util
import json
import os
import sys
import time
from typing import Any, Callable, Sequence

import ml_collections

from slkd_jax import config as config_lib
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
        config_lib.validate(c)
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
  config_lib.validate(c)
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
  path = os.path.join(workdir, "table.csv")
  with open(path + ".tmp", "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=list(records[0]))
    writer.writeheader()
    writer.writerows(records)
  os.replace(path + ".tmp", path)


def _write_atomic(path: str, text: str) -> None:
  with open(path + ".tmp", "w") as f:
    f.write(text)
  os.replace(path + ".tmp", path)


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


def run_table(spec, workdir: str, out: Callable[[str], None] = print
              ) -> list[dict]:
  """Train every unfinished cell (teachers first), rewriting the outputs
  after each; returns every run's record."""
  from slkd_jax import train  # noqa: PLC0415 (jax only when training)
  os.makedirs(workdir, exist_ok=True)
  runs = plan(spec, workdir)
  teachers = attach_teachers(spec, runs, workdir)
  progress = Progress(len(teachers) + len(runs),
                      sum(images_of(c) for c in teachers.values())
                      + sum(images_of(r.config) for r in runs), out)
  for teacher_dir, config in teachers.items():
    if stage_result(teacher_dir, "ce") is not None:
      progress.skip(images_of(config))
      continue
    _train(train, config, teacher_dir, progress, 1,
           f"teacher {config.student.arch}")
  # Each run's record is read once, when it is known to be done.
  records = [run_numbers(r) for r in runs]
  for cell_dir, members in cells_of(runs).items():
    cell = [runs[i] for i in members]
    images = images_of(cell[0].config)
    if all(records[i]["finished"] or records[i]["diverged"]
           for i in members):
      progress.skip(images, len(cell))
      continue
    config = study_config(cell) if runs_as_studies(spec) else cell[0].config
    seeds = ", ".join(str(run.seed) for run in cell)
    _train(train, config, cell_dir, progress, len(cell),
           f"{cell[0].row} on {cell[0].pair}, seed{'s' * (len(cell) > 1)} "
           f"{seeds}")
    for i in members:
      records[i] = run_numbers(runs[i])
    write_outputs(spec, records, workdir)
  write_outputs(spec, records, workdir)
  out(f"table: all {len(runs)} runs finished; {os.path.join(workdir, 'table.md')}")
  return records


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
  from slkd_jax import parallel, studies, train_step  # noqa: PLC0415
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
    teacher = state_lib.ModelState(params, stats)
  n = TRAIN_EXAMPLES.get(c.data.name, c.data.num_train)
  rng = np.random.default_rng(0)
  labels = rng.integers(0, c.data.num_classes, n).astype(np.int32)
  b = c.batch_size
  batch = jax.device_put({
      "image": rng.standard_normal((b, *stage.image_shape), np.float32),
      "label": labels[:b], "mask": np.ones(b, bool),
      "index": np.arange(b, dtype=np.int32)}, parallel.batch_sharding(mesh))
  if runs == 1:
    state = state_lib.create_state(stage, mesh, teacher, labels)
    step = train_step.make_train_step(stage, mesh)
    hp = stage.hparams(1)
    advance = lambda s: step(s, batch, hp)  # noqa: E731
  else:
    state = studies.create_runs_state(stage, mesh, range(runs), teacher,
                                      labels)
    step = studies.make_runs_step(stage, mesh,
                                  c.study.impl or c.slkd.ensemble)
    hps, alive = studies.stack([stage.hparams(1)] * runs), np.ones(runs, bool)
    advance = lambda s: step(s, alive, batch, hps)[::2]  # noqa: E731
  state, m = advance(state)
  jax.block_until_ready(m)
  start = time.perf_counter()
  for _ in range(steps):
    state, m = advance(state)
  jax.block_until_ready(m)
  return steps * b / (time.perf_counter() - start)


def dry_run(spec, workdir: str, measure: bool,
            out: Callable[[str], None] = print) -> list[dict]:
  """Print every cell (row × pair: seeds, the paper's number, images per
  run and, with ``measure``, the time per run from a short measured step)
  and the totals; nothing trains."""
  runs = plan(spec, workdir)
  teachers = attach_teachers(spec, runs, workdir)
  cells = []
  for label in spec.rows:
    for pair in spec.pairs:
      mine = [r for r in runs if r.row == label and r.pair == pair]
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
  out(_totals(cells, teachers, measure))
  return cells


def _totals(cells: Sequence[dict], teachers: dict, measure: bool) -> str:
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


def run_command(fv, positional: list[str]) -> None:
  """Train (or with ``--dry_run`` list) the table of ``--config``."""
  from slkd_jax import cli, parallel  # noqa: PLC0415
  cli.unexpected(positional)
  spec = cli.config_value(fv["config"])
  if spec is None or fv.workdir is None:
    raise errors.ConfigError("--config and --workdir are required")
  parallel.configure_jax(plan(spec, fv.workdir)[0].config)
  if fv.dry_run:
    dry_run(spec, fv.workdir, fv.measure)
  else:
    run_table(spec, fv.workdir)


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
