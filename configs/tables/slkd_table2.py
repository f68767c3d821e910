"""The SLKD paper's Table 2 on CIFAR-100: teacher and student of different
families, every comparison method slkd_jax has, SLKD and SLKD*, 3 seeds.

  python -m slkd_jax.table --config=configs/tables/slkd_table2.py \\
      --workdir=runs/table2 [--dry_run [--nomeasure]] [--shard=I/N]

Rows and paper numbers as in slkd_table1.py. A cell no source reports shows
"-": OFD and ReviewKD on vgg13-MobileNetV2 and wrn_40_2-ShuffleV1.
"""

from slkd_jax import table

ROWS = ("ce", "kd", "at", "sp", "rkd", "ofd", "crd", "reviewkd", "dkd",
        "slkd", "slkd_seq")


def get_config():
  return table.table_config(
      title="SLKD paper, Table 2 (CIFAR-100, cross-family pairs)",
      presets="configs/cifar100.py",
      pairs=("resnet32x4-ShuffleV2", "resnet32x4-ShuffleV1",
             "ResNet50-MobileNetV2", "vgg13-MobileNetV2",
             "wrn_40_2-ShuffleV1"),
      rows=ROWS)
