"""The SLKD paper's ablation (Table 7): the student learning from the teacher
only, from the fused SL-Ts only, or from both, and SLKD with K = 1..4 SL-Ts,
on its two pairs, 3 seeds.

  python -m slkd_jax.table --config=configs/tables/slkd_ablation.py \\
      --workdir=runs/ablation

Paper numbers from the presets (configs/cifar100.py ABLATION; "both" is the
paper's SLKD run with K = 2).
"""

from slkd_jax import table


def _slkd_with(k):
  return {"method": "slkd", "overrides": {"slkd": {"num_slts": k}}}


def get_config():
  variants = {f"slkd_K{k}": _slkd_with(k) for k in (1, 3, 4)}
  return table.table_config(
      title="SLKD paper, ablation (Table 7; K = number of SL-Ts)",
      presets="configs/cifar100.py",
      pairs=("resnet32x4-resnet8x4", "vgg13-MobileNetV2"),
      rows=("slkd_t_only", "slkd_slt_only", "slkd", *variants),
      variants=variants)
