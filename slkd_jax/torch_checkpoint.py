"""Reading a PyTorch ``.pth`` checkpoint (``torch`` is an optional extra:
``pip install -e ".[torch]"``, imported only here, only when a file is read).
"""

from __future__ import annotations

import pickle
import warnings
from typing import Any

from slkd_jax import errors
from slkd_jax.errors import ConversionError
from slkd_jax.torch_keys import unwrap_state_dict


def _import_torch():
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise errors.MissingDependencyError(
        "reading a PyTorch checkpoint needs torch, an optional extra: "
        "pip install -e '.[torch]' (the CPU build, torch==2.13.0, suffices)"
    ) from e
  return torch


def load_torch_checkpoint(path: str, allow_pickle: bool = True
                          ) -> dict[str, Any]:
  """Read a ``.pth`` file and return its (unwrapped) state_dict.

  Loads with ``torch.load(weights_only=True)`` first. Checkpoints that also
  pickle non-tensor objects (e.g. a numpy ``best_acc``) need the full
  unpickler, which can execute code from the file: with ``allow_pickle`` we
  fall back to it with a warning, otherwise we raise.
  """
  torch = _import_torch()
  hint = ("pass the checkpoint file itself (for mdistiller's release, extract "
          "cifar_teachers.tar and use <name>_vanilla/ckpt_epoch_240.pth)")
  try:
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
  except pickle.UnpicklingError as e:
    if not allow_pickle:
      raise ConversionError(
          f"{path} cannot be read with torch.load(weights_only=True) (it "
          f"holds non-tensor objects, or it is not a PyTorch checkpoint). If "
          f"you trust the file, allow the full unpickler (allow_pickle=True; "
          f"drop --weights-only on the command line); else {hint}.") from e
    warnings.warn(
        f"{path} holds objects torch.load(weights_only=True) refuses; "
        f"retrying with weights_only=False, which runs pickled code from the "
        f"file: only do this for checkpoints you trust (allow_pickle=False / "
        f"--weights-only forbids it)", stacklevel=2)
    try:
      checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e2:  # any failure here means: not a checkpoint
      raise ConversionError(f"cannot read {path} as a PyTorch checkpoint "
                       f"({type(e2).__name__}: {e2}); {hint}") from e2
  except (RuntimeError, EOFError, OSError) as e:
    if isinstance(e, FileNotFoundError):
      raise
    raise ConversionError(f"cannot read {path} as a PyTorch checkpoint "
                     f"({type(e).__name__}: {e}); {hint}") from e
  return unwrap_state_dict(checkpoint)
