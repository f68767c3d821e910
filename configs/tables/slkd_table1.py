"""The SLKD paper's Table 1 on CIFAR-100: teacher and student of the same
family, every comparison method slkd_jax has, 3 seeds.

  python -m slkd_jax.table --config=configs/tables/slkd_table1.py \\
      --workdir=runs/table1 [--dry_run [--nomeasure]]

Paper numbers come from the presets (configs/cifar100.py: the SLKD paper's
student alone, KD, DKD and SLKD); the other rows' published numbers are not
recorded there and show as "—". Set ``teachers`` (architecture →
checkpoint, e.g. converted reference teachers) to distil from those instead
of training one teacher per architecture.
"""

from slkd_jax import table

# The paper's rows: the student alone, the comparison methods, SLKD.
ROWS = ("ce", "kd", "at", "sp", "rkd", "ofd", "crd", "reviewkd", "dkd",
        "slkd")


def get_config():
  return table.table_config(
      title="SLKD paper, Table 1 (CIFAR-100, same-family pairs)",
      presets="configs/cifar100.py",
      pairs=("resnet32x4-resnet8x4", "resnet56-resnet8", "wrn_40_2-wrn_40_1",
             "wrn_40_2-wrn_16_2", "vgg13-vgg11", "vgg13-vgg8"),
      rows=ROWS)
