"""A table small enough for a CPU: the quickstart's digits pair (resnet14 →
resnet8, 6 epochs), KD, DKD, RKD and SLKD against the student alone, 2
seeds. A few minutes on 2 CPU cores; the README shows its output.

  python -m slkd_jax.table --config=configs/tables/digits.py \\
      --workdir=/tmp/slkd_digits_table
"""

from slkd_jax import table


def get_config():
  return table.table_config(
      title="Digits (quickstart pair): student alone, KD, DKD, RKD, SLKD",
      presets="configs/quickstart.py", pairs=("resnet14-resnet8",),
      rows=("ce", "kd", "dkd", "rkd", "slkd"), seeds=(0, 1))
