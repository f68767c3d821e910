"""Import PyTorch teachers (RepDistiller / mdistiller / torchvision zoos).

The CIFAR-100 KD literature distils from the same published PyTorch teachers
(mdistiller's ``cifar_teachers``, torchvision's ImageNet weights); this
command turns such a checkpoint into the flax variables of our model of the
same name and stores it as an orbax checkpoint the trainer can name as its
teacher::

  python -m slkd_jax.convert_torch --arch resnet32x4 \\
      --checkpoint cifar_teachers/resnet32x4_vanilla/ckpt_epoch_240.pth \\
      --out teachers/resnet32x4

Exit status (:mod:`slkd_jax.cli`): 0 done; 2 a problem the one ``error:``
line explains (an unknown architecture, a checkpoint that does not match
it, an existing --out without --force, a full disk).

The work is split by job; this module is the command and the public entry
points, importable from here:

* :mod:`slkd_jax.torch_keys`: the naming rule and the strict conversion of a
  state_dict (:func:`convert_state_dict`, :func:`torch_module_path`,
  :func:`canonical_torch_key`, :func:`unwrap_state_dict`,
  :func:`abstract_variables`);
* :mod:`slkd_jax.torch_checkpoint`: reading a ``.pth`` with ``torch``, an
  optional extra (:func:`load_torch_checkpoint`);
* :mod:`slkd_jax.teacher_dir`: the converted teacher's directory
  (:func:`save_teacher`, :func:`load_converted`).
"""

from __future__ import annotations

import math
import os
from typing import Sequence

from absl import flags

from slkd_jax import cli
from slkd_jax.errors import ConfigError, ConversionError
from slkd_jax.teacher_dir import (METADATA_FILE, VARIABLES_DIR,
                                  load_converted, save_teacher)
from slkd_jax.torch_checkpoint import load_torch_checkpoint
from slkd_jax.torch_keys import (abstract_variables, canonical_torch_key,
                                 convert_state_dict, flatten,
                                 torch_module_path, unwrap_state_dict)

__all__ = ["ConversionError", "METADATA_FILE", "VARIABLES_DIR",
           "abstract_variables", "canonical_torch_key", "convert_state_dict",
           "load_converted", "load_torch_checkpoint", "main", "save_teacher",
           "torch_module_path", "unwrap_state_dict"]

PROG = "python -m slkd_jax.convert_torch"


def define_flags(fv: flags.FlagValues, argv: Sequence[str]) -> None:
  """The flags of ``python -m slkd_jax.convert_torch``."""
  del argv  # no config flag
  flags.DEFINE_string("arch", None, "Registry name of the architecture, e.g. "
                      "resnet32x4.", flag_values=fv)
  flags.DEFINE_string("checkpoint", None, "PyTorch checkpoint (.pth): a "
                      "state_dict or a dict holding it under 'model' / "
                      "'state_dict' / 'net'.", flag_values=fv)
  flags.DEFINE_string("out", None, "Output directory of the teacher "
                      "checkpoint.", flag_values=fv)
  flags.DEFINE_integer("num_classes", None, "Classifier width (default: from "
                       "the checkpoint).", flag_values=fv)
  flags.DEFINE_bool("force", False, "Replace an existing teacher checkpoint "
                    "in --out.", flag_values=fv)
  flags.DEFINE_bool("weights_only", False, "Never fall back to "
                    "torch.load(weights_only=False).", flag_values=fv)
  flags.mark_flags_as_required(["arch", "checkpoint", "out"], flag_values=fv)


def convert(fv: flags.FlagValues, positional: list[str]) -> None:
  """Convert ``--checkpoint`` into a teacher directory ``--out``."""
  from slkd_jax import models
  cli.unexpected(positional)
  if not os.path.isfile(fv.checkpoint):
    raise ConfigError(f"--checkpoint={fv.checkpoint} is not a file (give the "
                      f"PyTorch .pth file)")
  if fv.arch not in models.available():
    raise ConfigError(f"unknown --arch {fv.arch!r}; available: "
                      f"{', '.join(models.available())}")
  variables, meta = load_converted(fv.checkpoint, fv.arch, fv.num_classes,
                                   allow_pickle=not fv.weights_only)
  try:
    out = save_teacher(variables, fv.out, fv.arch, meta["num_classes"],
                       source=meta["source"], overwrite=fv.force)
  except FileExistsError as e:
    raise ConfigError(str(e)) from None
  stats = sum(math.prod(v.shape) for k, v in flatten(variables).items()
              if k[0] == "batch_stats")
  print(f"converted {fv.checkpoint} -> {fv.arch} "
        f"({meta['num_classes']} classes): {meta['num_params']:,} parameters, "
        f"{stats:,} BatchNorm statistics")
  print(f"wrote teacher checkpoint {out} "
        f"(set config.teacher.checkpoint={out})")


def main(argv: Sequence[str] | None = None) -> int:
  """``python -m slkd_jax.convert_torch``: convert a .pth into a teacher
  dir; ``argv``: the arguments after the program name (default
  ``sys.argv[1:]``). Returns the exit status."""
  return cli.run(define_flags, convert, argv, prog=PROG, doc=__doc__,
                 output=lambda fv: fv.out)


if __name__ == "__main__":
  cli.start(main)
