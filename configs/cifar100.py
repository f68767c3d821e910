r"""CIFAR-100 presets: the paper's teacher → student pairs, every method.

Usage (the text after ``:`` is ``PAIR`` or ``PAIR,METHOD``)::

  python -m slkd_jax.main --config=configs/cifar100.py --workdir=/tmp/r32x4_r8x4
  python -m slkd_jax.main --config=configs/cifar100.py:vgg13-MobileNetV2,dkd \
      --workdir=/tmp/vgg13_mv2_dkd
  python -m slkd_jax.main \
      --config=configs/cifar100.py:resnet32x4-resnet8x4,slkd_slt_only \
      --workdir=/tmp/r32x4_r8x4_sltonly --config.seed=1

No argument means ``resnet32x4-resnet8x4,slkd`` (K = 2 SL-Ts). Any key can
still be overridden on the command line (``--config.slkd.num_slts=3``,
``--config.dtype=bfloat16``, ...).

Methods: ``ce`` (CE only: the student from scratch), ``kd``, ``dkd``,
``slkd`` (default), ``slkd_t_only``, ``slkd_slt_only`` (paper Table 7
ablations), ``slkd_seq`` (the paper's SLKD*) and the feature-based
comparison methods ``fitnet``, ``at``, ``sp``, ``rkd``, ``pkt``, ``nst``,
``kdsvd``, ``vid`` (mdistiller's settings), and ``dml`` (deep mutual
learning, below). One command runs the paper's
comparison from one teacher and prints one table::

  python -m slkd_jax.main --config=configs/cifar100.py --workdir=runs/cmp \
      --config.compare_with="('kd','dkd','fitnet','at','sp','rkd','pkt','nst','kdsvd','vid')"

Recipe (the reference code, mdistiller's CIFAR-100 setting; one recipe per
method in ``config.recipes``, every stage with its own): SGD with
momentum 0.9 and weight decay 5e-4, batch 64, 240 epochs, lr 0.05 — 0.01
when the student is MobileNetV2, ShuffleV1 or ShuffleV2 (the SL-Ts then use
0.01 too) — ×0.1 after epochs 150, 180 and 210.
``kd`` and the SLKD family: T = 4, CE 0.1, KD 0.9 (SLKD's fused-SL-T term
weights 1). ``dkd``: CE 1.0, α 1, β per pair (below), T 4, warm-up 20
epochs. ``ce``: CE weight 1. Feature-based methods: CE 1 and mdistiller's
feature weight (FitNet 100, AT 1000, SP 3000, RKD 1, PKT 30000, NST 50,
KDSVD 1, VID 1; docs/method.md §3).

DML (deep mutual learning, Zhang et al. 2018; docs/dml.md)
----------------------------------------------------------
K = 2 peers trained together from scratch, no teacher: peer 0 is
``student.arch``, peer 1 (..K−1) ``teacher.arch``. Two presets:
``resnet32-resnet32`` (two ResNet-32, method ``dml`` by default; ``,ce``
trains one ResNet-32 alone with the same recipe, the paper's "independent"
baseline) and the mixed pair ``resnet32x4-ShuffleV2,dml`` (peer 0
ShuffleV2, peer 1 resnet32x4). ``dml`` on any pair uses the DML paper's
CIFAR-100 recipe instead of mdistiller's: SGD momentum 0.9, lr 0.1 ×0.1
every 60 epochs, 200 epochs, batch 64, CE + KL at T = 1; weight decay 5e-4
is ours (see docs/dml.md for what the paper states). The paper's Nesterov
momentum is pending (plain momentum until ``optim.nesterov`` exists).

Teachers
--------
``teacher.checkpoint`` is None by default: the run first trains the teacher
with CE (stage "teacher": 240 epochs, lr 0.05, the same schedule — how
RepDistiller trained the reference teachers), then distils. To distil from the
reference teachers instead, download mdistiller's ``cifar_teachers.tar``
(a release asset of https://github.com/megvii-research/mdistiller/releases/tag/checkpoints,
as mdistiller's README says), unpack it (``tar xvf cifar_teachers.tar``) and
either pass the PyTorch file directly (converted on the fly)::

  --config.teacher.checkpoint=/path/to/cifar_teachers/resnet32x4_vanilla/ckpt_epoch_240.pth

or convert it once and point at the result::

  python -m slkd_jax.convert_torch --arch resnet32x4 \
      --checkpoint /path/to/cifar_teachers/resnet32x4_vanilla/ckpt_epoch_240.pth \
      --out teachers/resnet32x4
  ... --config.teacher.checkpoint=teachers/resnet32x4

The release holds resnet56, resnet110, resnet32x4, ResNet50, wrn_40_2 and
vgg13, i.e. every teacher below; their own top-1 is the "teacher" column.

Presets and the paper's CIFAR-100 top-1 (best epoch, %)
-------------------------------------------------------
The comparison methods' published numbers (AT, SP, RKD, OFD, CRD,
ReviewKD; the other rows of the paper's Tables 1-2) are in
:data:`COMPARISON_TOP1`, each with its source; ``paper_top1`` and the table
runner (``configs/tables/slkd_table1.py``, ``slkd_table2.py``) show them.

``--`` = not reported by the SLKD paper (the pairs it does not study; they
are mdistiller's standard pairs, here for comparison with DKD's results).
The teacher column of those rows is the released reference teacher's own
top-1.

======================  =====  =======  =====  =====  =====  =====  =====
preset                  β DKD  teacher  stud.  KD     DKD    SLKD   SLKD*
======================  =====  =======  =====  =====  =====  =====  =====
resnet32x4-resnet8x4    8      79.42    72.50  73.33  76.32  76.85  75.61
resnet56-resnet8        8      72.34    59.98  60.17  61.62  62.05  61.99
wrn_40_2-wrn_40_1       6      75.61    71.98  73.54  74.81  74.91  74.60
wrn_40_2-wrn_16_2       6      75.61    73.26  74.92  76.24  76.31  75.78
vgg13-vgg11             6      74.64    71.32  74.54  74.92  75.46  74.96
vgg13-vgg8              6      74.64    70.36  72.98  74.68  75.01  74.41
resnet32x4-ShuffleV2    8      79.42    71.82  74.45  77.07  77.26  76.12
resnet32x4-ShuffleV1    8      79.42    70.50  74.07  76.45  76.17  75.34
ResNet50-MobileNetV2    8      79.34    64.60  67.35  70.35  70.43  68.29
vgg13-MobileNetV2       6      74.64    64.60  67.37  69.71  69.94  69.36
wrn_40_2-ShuffleV1      8      75.61    70.50  74.83  76.70  76.72  76.29
resnet56-resnet20       2      72.34    --     --     --     --     --
resnet110-resnet32      2      74.31    --     --     --     --     --
resnet110-resnet20      8      74.31    --     --     --     --     --
======================  =====  =======  =====  =====  =====  =====  =====

Paper Table 7 (ablation, SLKD): resnet32x4-resnet8x4 teacher-only 73.33,
SL-T-only 75.71, both 76.13; vgg13-MobileNetV2 67.37 / 68.76 / 69.25
(``slkd_t_only`` / ``slkd_slt_only`` / ``slkd``).

DKD's β follows the per-pair values of mdistiller's DKD configs: 2 for
resnet56→resnet20 and resnet110→resnet32; 6 for the WRN→WRN and VGG→VGG pairs
and vgg13→MobileNetV2; 8 (DKD's default) otherwise — also for
wrn_40_2→ShuffleV1, whose mdistiller config keeps the default.

Self-distillation presets (TESKD)
---------------------------------
``cifar_resnet18`` and ``cifar_resnet34`` train one network, no teacher:
``teskd`` (the default method of these presets) trains the kuangliu CIFAR
ResNet with TESKD's top-down path and three branches
(``teskd_cifar_resnet18/34``, docs/teskd.md); ``ce`` trains the plain backbone
alone on the same recipe (the paper's baseline). Recipe (TESKD's
``main.py``): SGD, Nesterov momentum 0.9, weight decay 5e-4, lr 0.1, batch
128, 200 epochs, ×0.1 after epochs 100 and 150, CIFAR-10 normalisation
constants, loss T 4 / CE 0.2 / KL 0.8 / feature 1e-7; the reported top-1 is
the backbone's best over epochs 151–200 (``report_best_after_epoch=150``)::

  python -m slkd_jax.main --config=configs/cifar100.py:cifar_resnet18,teskd \
      --workdir=/tmp/teskd_r18

Paper (TESKD, arXiv 2110.00329), CIFAR-100 top-1: ResNet-18 TESKD 79.15,
baseline 74.41 (derived: 79.15 − 4.74); ResNet-34: not stated.

Expected wall time (estimates, not measurements)
------------------------------------------------
Every preset runs 240 epochs of 782 steps (batch 64), about 188k steps. At
batch 64 the small CIFAR networks leave a modern GPU mostly idle, so steps
are latency-bound: plan on the order of an hour or more on one modern GPU for
``kd``/``dkd``/``ce`` of a small pair, and more for the bigger teachers.
``slkd`` (and its variants) also *trains* K = 2 SL-Ts of the teacher's
architecture every step, so a step costs roughly a student training step,
a teacher forward pass and K teacher training steps — several times a KD
step when the teacher is much bigger than the student (resnet32x4, vgg13,
ResNet50 teachers). The ResNet50 teacher (23.7 M parameters, full 32×32
resolution in its first stage) is by far the heaviest preset. Add a teacher
training run when ``teacher.checkpoint`` is None. The per-preset note in
:data:`PRESETS` says which tier a pair falls in; measure your own hardware
before planning. ``--config.num_epochs=1`` alone still trains the full
240-epoch teacher first (it sets only the distillation's epochs): time one
epoch of every stage with ::

  python -m slkd_jax.main --config=configs/cifar100.py --workdir=/tmp/timing \
      --config.num_epochs=1 --config.teacher.num_epochs=1

or give a converted teacher (``--config.teacher.checkpoint``, above), or time
the compiled steps alone: ``python -m slkd_jax.table
--config=configs/tables/slkd_table1.py --workdir=/tmp/t1 --dry_run`` (each
cell's step, no data or teacher needed) and ``benchmarks/compare.py``.
"""

# No ``from __future__ import annotations``: loaded by path without an entry
# in sys.modules (importlib.util.spec_from_file_location), dataclasses could
# not resolve string annotations.
import dataclasses

from slkd_jax import config as config_lib
from slkd_jax import errors

# What each entry of Preset.paper is, in order: the method whose run it is
# the paper's result for ("ce" = the student trained alone).
PAPER_COLUMNS = ("ce", "kd", "dkd", "slkd", "slkd_seq")

# Paper Table 7 (ablation): the two pairs it studies. ``slkd_t_only`` is KD;
# its "both" column (76.13 / 69.25) is a separate run of ``slkd``.
ABLATION = {
    "resnet32x4-resnet8x4": {"slkd_t_only": 73.33, "slkd_slt_only": 75.71},
    "vgg13-MobileNetV2": {"slkd_t_only": 67.37, "slkd_slt_only": 68.76},
}

# Published top-1 of the SLKD paper's comparison rows (Tables 1-2: AT, SP,
# RKD, OFD, CRD, ReviewKD), by method and pair: what ``paper_top1`` gives
# for those methods. The SLKD paper's own table text could not be read when
# these were filled in, so each number comes from the source named in its
# block, not from the SLKD paper: the published benchmark that its student,
# KD and DKD columns reproduce digit for digit. No source reports
# resnet56-resnet8 or vgg13-vgg11 (the SLKD paper's own pairs), nor OFD /
# ReviewKD on the pairs missing below: those cells stay "-".
COMPARISON_TOP1 = {
    # RepDistiller README (github.com/HobbitLong/RepDistiller, commit
    # b84f547; the CRD paper's benchmark), "Benchmark Results on CIFAR-100",
    # table 1 (same architectural type) and table 2 (different), rows AT,
    # SP, RKD and CRD.
    "at": {"wrn_40_2-wrn_16_2": 74.08, "wrn_40_2-wrn_40_1": 72.77,
           "resnet32x4-resnet8x4": 73.44, "vgg13-vgg8": 71.43,
           "vgg13-MobileNetV2": 59.40, "ResNet50-MobileNetV2": 58.58,
           "resnet32x4-ShuffleV1": 71.73, "resnet32x4-ShuffleV2": 72.73,
           "wrn_40_2-ShuffleV1": 73.32},
    "sp": {"wrn_40_2-wrn_16_2": 73.83, "wrn_40_2-wrn_40_1": 72.43,
           "resnet32x4-resnet8x4": 72.94, "vgg13-vgg8": 72.68,
           "vgg13-MobileNetV2": 66.30, "ResNet50-MobileNetV2": 68.08,
           "resnet32x4-ShuffleV1": 73.48, "resnet32x4-ShuffleV2": 74.56,
           "wrn_40_2-ShuffleV1": 74.52},
    "rkd": {"wrn_40_2-wrn_16_2": 73.35, "wrn_40_2-wrn_40_1": 72.22,
            "resnet32x4-resnet8x4": 71.90, "vgg13-vgg8": 71.48,
            "vgg13-MobileNetV2": 64.52, "ResNet50-MobileNetV2": 64.43,
            "resnet32x4-ShuffleV1": 72.28, "resnet32x4-ShuffleV2": 73.21,
            "wrn_40_2-ShuffleV1": 72.21},
    "crd": {"wrn_40_2-wrn_16_2": 75.48, "wrn_40_2-wrn_40_1": 74.14,
            "resnet32x4-resnet8x4": 75.51, "vgg13-vgg8": 73.94,
            "vgg13-MobileNetV2": 69.73, "ResNet50-MobileNetV2": 69.11,
            "resnet32x4-ShuffleV1": 75.11, "resnet32x4-ShuffleV2": 75.65,
            "wrn_40_2-ShuffleV1": 76.05},
    # README of github.com/WangYZ1608/Knowledge-Distillation-via-ND (the
    # KD++ paper, arXiv 2305.17007), "1.1 CIFAR-100", rows OFD and ReviewKD,
    # as of commit 9e63f46 (later versions drop the OFD row). Its CRD and
    # RKD rows equal RepDistiller's above; its KD cell of
    # ResNet50-MobileNetV2 reads 67.65 where RepDistiller prints 67.35.
    "ofd": {"wrn_40_2-wrn_40_1": 74.33, "resnet32x4-resnet8x4": 74.95,
            "ResNet50-MobileNetV2": 69.04, "resnet32x4-ShuffleV1": 75.98,
            "resnet32x4-ShuffleV2": 76.82},
    "reviewkd": {"wrn_40_2-wrn_40_1": 75.09, "resnet32x4-resnet8x4": 75.63,
                 "ResNet50-MobileNetV2": 69.89, "resnet32x4-ShuffleV1": 77.45,
                 "resnet32x4-ShuffleV2": 77.78,
                 # Papers with Code, "Distilling Knowledge via Knowledge
                 # Review", results from the paper: vgg8 (T:vgg13 S:vgg8)
                 # 74.84 (and resnet8x4 75.63, as above).
                 "vgg13-vgg8": 74.84},
}

# Students the reference trains with lr 0.01 instead of 0.05 (mdistiller /
# RepDistiller's setting for the mobile networks).
LOW_LR_STUDENTS = ("MobileNetV2", "ShuffleV1", "ShuffleV2")

# DML presets (docs/dml.md): peers keyed "PEER1-PEER0" like the pairs
# (teacher.arch = peers 1..K-1, student.arch = peer 0); methods dml or ce.
DML_PRESETS = {"resnet32-resnet32": ("resnet32", "resnet32")}
DML_PRESET_METHODS = ("dml", "ce")

DEFAULT_PRESET = "resnet32x4-resnet8x4"
DEFAULT_METHOD = "slkd"

# Wall-time tiers (see the module docstring; estimates only).
_LIGHT = ("light: small teacher; KD on the order of an hour or more on one "
          "modern GPU, SLKD a few times that (estimate)")
_MEDIUM = ("medium: the teacher is several times the student; SLKD's two "
           "teacher-sized SL-Ts dominate (several times a KD run; estimate)")
_HEAVY = ("heavy: ResNet50 teacher (23.7 M params); SLKD trains two of them, "
          "many hours on one GPU (estimate)")


@dataclasses.dataclass(frozen=True)
class Preset:
  """One teacher → student pair.

  Attributes:
    teacher: teacher (and SL-T) architecture, a ``slkd_jax.models`` name.
    student: student architecture.
    dkd_beta: DKD's β for this pair (mdistiller's per-pair configs).
    teacher_top1: the released reference teacher's CIFAR-100 top-1.
    paper: the SLKD paper's top-1 of the runs named by
      :data:`PAPER_COLUMNS` (student alone, KD, DKD, SLKD, SLKD*), or None
      where the paper does not report the pair.
    wall_time: a coarse, honest cost estimate (see the module docstring).
  """
  teacher: str
  student: str
  dkd_beta: float
  teacher_top1: float
  paper: tuple[float, float, float, float, float] | None
  wall_time: str

  @property
  def learning_rate(self) -> float:
    return 0.01 if self.student in LOW_LR_STUDENTS else 0.05


def _dkd_beta(teacher: str, student: str) -> float:
  """DKD's β as mdistiller's per-pair CIFAR configs set it."""
  if (teacher, student) in (("resnet56", "resnet20"),
                            ("resnet110", "resnet32")):
    return 2.0
  same_family = any(teacher.startswith(f) and student.startswith(f)
                    for f in ("wrn_", "vgg"))
  if same_family or (teacher, student) == ("vgg13", "MobileNetV2"):
    return 6.0
  return 8.0  # DKD's default


def _preset(teacher, student, teacher_top1, paper, wall_time) -> Preset:
  return Preset(teacher, student, _dkd_beta(teacher, student), teacher_top1,
                paper, wall_time)


# Paper numbers: SLKD paper (arXiv 2304.11923), CIFAR-100 top-1, best epoch.
PRESETS: dict[str, Preset] = {f"{p.teacher}-{p.student}": p for p in [
    _preset("resnet32x4", "resnet8x4", 79.42,
            (72.50, 73.33, 76.32, 76.85, 75.61), _MEDIUM),
    _preset("resnet56", "resnet8", 72.34,
            (59.98, 60.17, 61.62, 62.05, 61.99), _LIGHT),
    _preset("wrn_40_2", "wrn_40_1", 75.61,
            (71.98, 73.54, 74.81, 74.91, 74.60), _LIGHT),
    _preset("wrn_40_2", "wrn_16_2", 75.61,
            (73.26, 74.92, 76.24, 76.31, 75.78), _LIGHT),
    _preset("vgg13", "vgg11", 74.64,
            (71.32, 74.54, 74.92, 75.46, 74.96), _MEDIUM),
    _preset("vgg13", "vgg8", 74.64,
            (70.36, 72.98, 74.68, 75.01, 74.41), _MEDIUM),
    _preset("resnet32x4", "ShuffleV2", 79.42,
            (71.82, 74.45, 77.07, 77.26, 76.12), _MEDIUM),
    _preset("resnet32x4", "ShuffleV1", 79.42,
            (70.50, 74.07, 76.45, 76.17, 75.34), _MEDIUM),
    _preset("ResNet50", "MobileNetV2", 79.34,
            (64.60, 67.35, 70.35, 70.43, 68.29), _HEAVY),
    _preset("vgg13", "MobileNetV2", 74.64,
            (64.60, 67.37, 69.71, 69.94, 69.36), _MEDIUM),
    _preset("wrn_40_2", "ShuffleV1", 75.61,
            (70.50, 74.83, 76.70, 76.72, 76.29), _LIGHT),
    # mdistiller's other standard pairs (not in the SLKD paper).
    _preset("resnet56", "resnet20", 72.34, None, _LIGHT),
    _preset("resnet110", "resnet32", 74.31, None, _LIGHT),
    _preset("resnet110", "resnet20", 74.31, None, _LIGHT),
]}



@dataclasses.dataclass(frozen=True)
class SelfPreset:
  """One network trained without a teacher (self-distillation).

  Attributes:
    backbone: the deployed network's architecture (``ce`` trains it alone).
    method_archs: the architecture each method trains (the backbone with
      the method's extra heads).
    paper: the paper's CIFAR-100 top-1 per method, where it states one.
    wall_time: a coarse cost estimate.
  """
  backbone: str
  method_archs: dict
  paper: dict
  wall_time: str


_TESKD_COST = ("medium: the heads hold 2.3x the backbone's parameters (the "
               "k=8 head alone 17 M); a few times a CE run (estimate)")

SELF_PRESETS: dict[str, SelfPreset] = {
    # TESKD paper: 79.15 with TESKD, +4.74 over the baseline (74.41).
    "cifar_resnet18": SelfPreset(
        "cifar_resnet18", {"teskd": "teskd_cifar_resnet18"},
        {"teskd": 79.15, "ce": 74.41}, _TESKD_COST),
    "cifar_resnet34": SelfPreset(
        "cifar_resnet34", {"teskd": "teskd_cifar_resnet34"}, {},
        _TESKD_COST),
}
SELF_METHODS = ("teskd", "ce")
SELF_DEFAULT_METHOD = "teskd"
# TESKD's dataset.py normalises CIFAR-100 with CIFAR-10's constants.
TESKD_MEAN = (0.4914, 0.4822, 0.4465)
TESKD_STD = (0.2023, 0.1994, 0.2010)


def results_table() -> list[str]:
  """The rows of the module docstring's table, from :data:`PRESETS` (a test
  keeps the two in sync)."""
  rows = []
  for name, p in PRESETS.items():
    nums = p.paper if p.paper is not None else ("--",) * 5
    cells = [name.ljust(22), f"{p.dkd_beta:g}".ljust(5),
             f"{p.teacher_top1:.2f}".ljust(7)]
    cells += [(n if isinstance(n, str) else f"{n:.2f}").ljust(5) for n in nums]
    rows.append("  ".join(cells).rstrip())
  return rows


def paper_top1(preset: str, method: str) -> float | None:
  """The paper's CIFAR-100 top-1 for ``method`` on ``preset``; None where it
  reports none (a run's log can print it next to the measured top-1)."""
  if preset in SELF_PRESETS:
    return SELF_PRESETS[preset].paper.get(method)
  p = PRESETS[preset]
  if method in ABLATION.get(preset, {}):
    return ABLATION[preset][method]
  if p.paper is None:
    return None
  if method == "slkd_t_only":
    method = "kd"  # the ablation's teacher-only student is plain KD
  if method in COMPARISON_TOP1:
    return COMPARISON_TOP1[method].get(preset)
  if method not in PAPER_COLUMNS:
    return None
  return p.paper[PAPER_COLUMNS.index(method)]


def parse_arg(arg: str | None) -> tuple[str, str]:
  """``'PAIR'`` / ``'PAIR,METHOD'`` / None → (preset name, method); a
  self-distillation preset (``cifar_resnet18[,teskd|ce]``) defaults to
  ``teskd``, a DML preset (``resnet32-resnet32[,dml|ce]``) to ``dml``."""
  name = (arg or "").partition(",")[0].strip()
  for presets, default, allowed, what in (
      (SELF_PRESETS, SELF_DEFAULT_METHOD, SELF_METHODS,
       "trains one network without a teacher"),
      (DML_PRESETS, "dml", DML_PRESET_METHODS,
       "trains peers from scratch (ce: one peer alone)")):
    if name in presets:
      name, method = config_lib.parse_preset(arg, presets, name, default,
                                             "CIFAR-100")
      if method not in allowed:
        raise errors.ConfigError(
            f"preset {name!r} {what}: method {' or '.join(allowed)}, not "
            f"{method!r}")
      return name, method
  return config_lib.parse_preset(arg, {**PRESETS, **SELF_PRESETS,
                                       **DML_PRESETS},
                                 DEFAULT_PRESET, DEFAULT_METHOD, "CIFAR-100")


def _dml_recipe(c) -> None:
  """The DML paper's CIFAR-100 training recipe (docs/dml.md); what the
  paper does not state stays ours (weight decay, augmentation, eval)."""
  c.batch_size = 64
  c.num_epochs = 200
  c.optim.learning_rate = 0.1
  c.optim.momentum = 0.9
  c.optim.nesterov = True  # the paper: SGD with Nesterov momentum
  c.optim.decay_epochs = (60, 120, 180)  # ×0.1 every 60 epochs
  c.optim.decay_rate = 0.1
  c.dml.num_peers = 2
  c.dml.update_order = "sequential"  # Algorithm 1


def get_config(arg: str | None = None):
  """The run config of preset ``arg`` (``PAIR`` or ``PAIR,METHOD``)."""
  name, method = parse_arg(arg)
  if name in SELF_PRESETS:
    return _self_config(SELF_PRESETS[name], method)
  if name in DML_PRESETS:  # peers, no teacher: no reference top-1, DKD unused
    preset = _preset(*DML_PRESETS[name], None, None, _LIGHT)
  else:
    preset = PRESETS[name]
  c = config_lib.base_config()
  c.method = method

  c.data.name = "cifar100"
  c.data.num_classes = 100
  c.data.image_size = 32

  c.teacher.arch = preset.teacher
  c.student.arch = preset.student
  # teacher.checkpoint stays None: stage "teacher" trains it first (see the
  # docstring for the reference teachers), with RepDistiller's CE recipe.
  c.teacher.num_epochs = 240
  c.teacher.learning_rate = 0.05

  c.batch_size = 64
  # Eval only runs forward passes; a power of two divides any device count
  # (the padded last batch of the 10k test images is masked).
  c.eval_batch_size = 1024
  c.num_epochs = 240

  c.optim.learning_rate = preset.learning_rate
  c.optim.momentum = 0.9
  c.optim.weight_decay = 5e-4
  c.optim.decay_epochs = (150, 180, 210)
  c.optim.decay_rate = 0.1

  c.slkd.num_slts = 2
  # Every method's loss settings for this pair, one sub-config each; every
  # stage (``method`` and each of ``compare_with``) runs with its own.
  # mdistiller's DKD: CE weight 1, α 1, β per pair, T 4, 20 warm-up epochs.
  c.recipes = config_lib.recipes(temperature=4.0, ce_weight=0.1,
                                 kd_weight=0.9, dkd_beta=preset.dkd_beta,
                                 dkd_warmup=20.0,
                                 pair=(preset.teacher, preset.student))

  c.log_every_steps = 100
  c.checkpoint_every_epochs = 10
  if method == "dml" or name in DML_PRESETS:
    _dml_recipe(c)
  return c


def _self_config(preset: SelfPreset, method: str):
  """TESKD's CIFAR-100 recipe (official main.py / dataset.py) for one
  network: ``method`` is ``teskd`` (backbone + heads) or ``ce``."""
  c = config_lib.base_config()
  c.method = method
  c.data.name = "cifar100"
  c.data.num_classes = 100
  c.data.image_size = 32
  c.data.mean, c.data.std = TESKD_MEAN, TESKD_STD
  c.student.arch = preset.method_archs.get(method, preset.backbone)
  c.teacher.arch = preset.backbone  # no teacher runs (no stage "teacher")
  c.batch_size = 128
  c.eval_batch_size = 1024
  c.num_epochs = 200
  c.optim.learning_rate = 0.1
  c.optim.momentum = 0.9
  c.optim.nesterov = True
  c.optim.weight_decay = 5e-4
  c.optim.decay_epochs = (100, 150)
  c.optim.decay_rate = 0.1
  c.report_best_after_epoch = 150  # main.py: sota_acc only after epoch 150
  # Other methods' recipes as the pair presets'; TESKD's own is fixed
  # (teskd.TESKD_DEFAULTS).
  c.recipes = config_lib.recipes(temperature=4.0, ce_weight=0.1,
                                 kd_weight=0.9, dkd_beta=8.0, dkd_warmup=20.0)
  c.log_every_steps = 100
  c.checkpoint_every_epochs = 10
  return c
