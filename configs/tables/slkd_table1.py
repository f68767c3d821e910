"""The SLKD paper's Table 1 on CIFAR-100: teacher and student of the same
family, every comparison method slkd_jax has, SLKD and SLKD*, 3 seeds.

  python -m slkd_jax.table --config=configs/tables/slkd_table1.py \\
      --workdir=runs/table1 [--dry_run [--nomeasure]] [--shard=I/N]

Paper numbers come from the presets (configs/cifar100.py): the SLKD paper's
student alone, KD, DKD, SLKD and SLKD* (``slkd_seq``) columns, and the
comparison rows' published numbers (``COMPARISON_TOP1``, each block naming
its source). A cell no source reports shows "-": AT, SP, RKD, OFD, CRD and
ReviewKD on resnet56-resnet8 and vgg13-vgg11 (the SLKD paper's own pairs),
OFD on wrn_40_2-wrn_16_2 and vgg13-vgg8, ReviewKD on wrn_40_2-wrn_16_2. Set
``teachers`` (architecture → checkpoint, e.g. converted reference teachers)
to distil from those instead of training one teacher per architecture.
"""

from slkd_jax import table

# The paper's rows: the student alone, the comparison methods, SLKD and
# SLKD* (slkd_seq: the SL-Ts updated one after the other).
ROWS = ("ce", "kd", "at", "sp", "rkd", "ofd", "crd", "reviewkd", "dkd",
        "slkd", "slkd_seq")


def get_config():
  return table.table_config(
      title="SLKD paper, Table 1 (CIFAR-100, same-family pairs)",
      presets="configs/cifar100.py",
      pairs=("resnet32x4-resnet8x4", "resnet56-resnet8", "wrn_40_2-wrn_40_1",
             "wrn_40_2-wrn_16_2", "vgg13-vgg11", "vgg13-vgg8"),
      rows=ROWS)
