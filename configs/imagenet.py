r"""ImageNet (ILSVRC-2012) presets: the paper's two teacher → student pairs.

Usage (the text after ``:`` is ``PAIR`` or ``PAIR,METHOD``)::

  python -m slkd_jax.main --config=configs/imagenet.py:resnet34-resnet18 \
      --workdir=/ckpt/r34_r18 --config.data.data_dir=/data/tfds \
      --config.teacher.checkpoint=teachers/imagenet_resnet34
  python -m slkd_jax.main --config=configs/imagenet.py:resnet50-mobilenetv1,dkd \
      --workdir=/ckpt/r50_mv1_dkd --config.data.data_dir=/data/tfds \
      --config.teacher.checkpoint=teachers/imagenet_resnet50

No argument means ``resnet34-resnet18,slkd`` (K = 2 SL-Ts). Methods as for
CIFAR-100: ``ce``, ``kd``, ``dkd``, ``slkd``, ``slkd_t_only``,
``slkd_slt_only``, ``slkd_seq``. The data is TFDS ``imagenet2012``, which
needs the manually downloaded ILSVRC-2012 archives prepared once with TFDS.

==========================  ==================  ======================  =====
preset                      teacher             student                 DKD β
==========================  ==================  ======================  =====
resnet34-resnet18           imagenet_resnet34   imagenet_resnet18       0.5
resnet50-mobilenetv1        imagenet_resnet50   imagenet_mobilenetv1    2
==========================  ==================  ======================  =====

Recipe (the reference code, mdistiller's ImageNet setting): SGD with momentum
0.9 and weight decay 1e-4, global batch 512, 100 epochs, lr 0.2 ×0.1 after
epochs 30, 60 and 90. ``kd`` and the SLKD family: T = 1, CE 0.5, KD 0.5
(SLKD's fused-SL-T term weights 1). ``dkd``: CE 1.0, α 1, β 0.5 (R34→R18) /
2.0 (R50→MV1), T 1, warm-up 1 epoch. ``ce``: CE weight 1.

``dtype`` is ``bfloat16``: convolutions and matmuls run in bfloat16 (tensor
cores on GPUs, the native MXU type on TPUs) while parameters, BatchNorm
statistics and logits stay float32. The reference trains in float32; use
``--config.dtype=float32`` for the closest match (slower).

Teachers
--------
The reference's ImageNet teachers are torchvision's pre-trained weights
(``IMAGENET1K_V1``, what ``pretrained=True`` loaded for mdistiller). Save the
state_dict and convert it once (``torch`` and ``torchvision`` needed only for
this step)::

  python -c "import torch, torchvision; torch.save(torchvision.models.resnet34(weights='IMAGENET1K_V1').state_dict(), 'resnet34.pth')"
  python -m slkd_jax.convert_torch --arch imagenet_resnet34 \
      --checkpoint resnet34.pth --out teachers/imagenet_resnet34

(``resnet50`` / ``--arch imagenet_resnet50`` likewise for the second pair),
then pass ``--config.teacher.checkpoint=teachers/imagenet_resnet34``. Without
a checkpoint the run would first train the teacher from scratch with CE on
this preset's recipe (stage "teacher") — possible, but not the reference.

Paper results: the SLKD paper reports ImageNet top-1 and top-5 for both pairs
next to its baselines; look them up in the paper (they are not copied here).

Wall time (an estimate, not a measurement): 100 ImageNet epochs of KD for
ResNet18 are days of single-GPU time; SLKD additionally trains K = 2 SL-Ts of
the teacher's architecture (ResNet34 / ResNet50) every step, several times
the cost of KD. Run it on many GPUs or hosts (the step is data-parallel over
all devices; the global batch stays 512) and measure a short run
(``--config.num_epochs=1``) first.
"""

import dataclasses

from slkd_jax import config as config_lib

DEFAULT_PRESET = "resnet34-resnet18"
DEFAULT_METHOD = "slkd"


@dataclasses.dataclass(frozen=True)
class Preset:
  """One ImageNet teacher → student pair (``slkd_jax.models`` names) and
  DKD's β for it (mdistiller's ImageNet DKD configs)."""
  teacher: str
  student: str
  dkd_beta: float


PRESETS: dict[str, Preset] = {
    "resnet34-resnet18": Preset("imagenet_resnet34", "imagenet_resnet18", 0.5),
    "resnet50-mobilenetv1": Preset("imagenet_resnet50", "imagenet_mobilenetv1",
                                   2.0),
}



def parse_arg(arg: str | None) -> tuple[str, str]:
  """``'PAIR'`` / ``'PAIR,METHOD'`` / None → (preset name, method)."""
  return config_lib.parse_preset(arg, PRESETS, DEFAULT_PRESET, DEFAULT_METHOD,
                                 "ImageNet")


def get_config(arg: str | None = None):
  """The run config of preset ``arg`` (``PAIR`` or ``PAIR,METHOD``)."""
  name, method = parse_arg(arg)
  preset = PRESETS[name]
  c = config_lib.base_config()
  c.method = method
  c.dtype = "bfloat16"  # see the module docstring

  c.data.name = "imagenet2012"
  c.data.num_classes = 1000
  c.data.image_size = 224

  c.teacher.arch = preset.teacher
  c.student.arch = preset.student
  # teacher.checkpoint stays None (set it to converted torchvision weights,
  # see the docstring). Stage "teacher" would then use the student recipe.
  c.teacher.num_epochs = 100
  c.teacher.learning_rate = 0.2

  c.batch_size = 512  # global, over all devices and hosts
  # Forward passes only; a power of two divides any device count, and the
  # padded last batch of the 50k validation images is masked.
  c.eval_batch_size = 1024
  c.num_epochs = 100

  c.optim.learning_rate = 0.2
  c.optim.momentum = 0.9
  c.optim.weight_decay = 1e-4
  c.optim.decay_epochs = (30, 60, 90)  # ×0.1 after epochs 30, 60, 90
  c.optim.decay_rate = 0.1

  c.slkd.num_slts = 2
  # mdistiller's ImageNet DKD configs: CE_WEIGHT 1.0 (DKD's default, set
  # explicitly there too), T 1, WARMUP 1, β per pair; α keeps the default 1.
  # Every stage runs with the recipe of its own method.
  c.recipes = config_lib.recipes(temperature=1.0, ce_weight=0.5,
                                 kd_weight=0.5, dkd_beta=preset.dkd_beta,
                                 dkd_warmup=1.0,
                                 pair=(preset.teacher, preset.student))

  c.log_every_steps = 100
  # An ImageNet epoch is long (2,502 steps at batch 512, more for SLKD), so a
  # preemption should lose at most one.
  c.checkpoint_every_epochs = 1
  return c
