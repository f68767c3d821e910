"""Offline quickstart: SLKD vs KD on scikit-learn's handwritten digits, on CPU.

  python -m slkd_jax.main --config=configs/quickstart.py --workdir=/tmp/slkd_quickstart

The digits (1,797 8×8 images that ship inside scikit-learn, upsampled to
32×32; 1,437 train / 360 test) need no download. The run trains a small
teacher with CE, then distils an 8-layer student with SLKD (K = 2 SL-Ts of
the teacher's architecture), with plain KD and with six feature-based
methods (FitNet, AT, RKD, OFD, CRD, ReviewKD) from that teacher, trains the
student and a teacher-sized peer together with DML, and prints the
comparison table. About ten minutes on 2 CPU cores; the README shows a run.
"""

from slkd_jax import config as config_lib
from slkd_jax import errors

#: The one pair (``configs/tables/digits.py`` names it like a preset).
PAIR = "resnet14-resnet8"


def get_config(arg=None):
  """The quickstart run; ``'resnet14-resnet8,METHOD'`` runs METHOD alone
  (no ``compare_with``), for tables; ``'teskd'`` trains TESKD on the digits
  (the kuangliu ResNet-18 with its branches: heavy on a CPU, see
  :func:`_teskd`)."""
  if (arg or "").strip() == "teskd":
    return _teskd(get_config(f"{PAIR},ce"))
  pair, _, method = (arg or "").partition(",")
  if pair.strip() not in ("", PAIR):
    raise errors.ConfigError(f"the quickstart has one pair, {PAIR!r} (or "
                             f"'teskd'), not {pair.strip()!r}")
  c = config_lib.base_config()
  c.data.name = "digits"
  c.data.num_classes = 10
  c.data.image_size = 32
  c.batch_size = 64
  c.eval_batch_size = 360

  c.teacher.arch = "resnet14"
  c.teacher.num_epochs = 8
  c.teacher.learning_rate = 0.05
  c.student.arch = "resnet8"
  c.method = "slkd"
  # A few of the paper's comparison methods, from the same teacher, and
  # DML (a resnet8 and a resnet14 peer from scratch, no teacher).
  c.compare_with = ("kd", "fitnet", "at", "rkd", "ofd", "crd", "reviewkd",
                    "dml")
  c.num_epochs = 6

  c.slkd.num_slts = 2
  c.optim.learning_rate = 0.05
  c.optim.decay_epochs = (5,)  # the reference's late-training decay, scaled
  c.optim.weight_decay = 5e-4

  c.log_every_steps = 10
  c.checkpoint_every_epochs = 2
  if method.strip():
    c.method, c.compare_with = method.strip(), ()
  return c


def _teskd(c):
  """TESKD (one network: the ResNet-18 backbone and three branches) on the
  digits with the reference's optimiser (Nesterov SGD, lr 0.1) and one
  epoch: a TESKD ResNet-18 step takes ~37 s at batch 64 on 2 CPU cores."""
  c.method, c.student.arch = "teskd", "teskd_cifar_resnet18"
  c.num_epochs = 1
  c.optim.learning_rate = 0.1
  c.optim.nesterov = True
  c.optim.decay_epochs = ()
  c.log_every_steps = 5
  return c
