"""LDM's EMA weights (``LitEma``) under the raw weights' keys.

``LitEma`` stores the shadow of parameter ``diffusion_model.input_blocks.0.0.weight`` of
``LatentDiffusion.model`` as ``model_ema.diffusion_modelinput_blocks00weight``: the name relative to
``model`` with the dots removed, beside the ``decay`` / ``num_updates`` buffers. The dot-less name
cannot be split back, so the mapping is driven by the raw keys.
"""

from typing import Mapping

import numpy as np

from midms_jax.errors import CheckpointError


def ema_state_dict(
    state_dict: Mapping[str, np.ndarray],
    ema_prefix: str,
    model_prefix: str,
    *,
    source: str = "state dict",
) -> dict[str, np.ndarray]:
  """A copy of ``state_dict`` whose entries under ``model_prefix`` are replaced by their EMA
  shadows.

  The shadow of ``model_prefix + name`` is ``ema_prefix + name.replace('.', '')`` (e.g. prefixes
  ``model.`` / ``model_ema.`` in an LDM ``.ckpt``, ``diff_model.model.`` / ``diff_model.model_ema.``
  in a MIDMs ``.pth``). Other entries, the shadows themselves included, are kept as they are, so
  the result loads like the original. Raises ``CheckpointError`` naming ``source`` if a shadow is
  missing or its shape differs.
  """
  names = [key[len(model_prefix) :] for key in state_dict if key.startswith(model_prefix)]
  if not names:
    raise CheckpointError(f"{source}: no '{model_prefix}*' weights in the state dict")
  missing, mismatched, result = [], [], dict(state_dict)
  for name in names:
    raw_key, ema_key = model_prefix + name, ema_prefix + name.replace(".", "")
    if ema_key not in state_dict:
      missing.append(ema_key)
    elif np.shape(state_dict[ema_key]) != np.shape(state_dict[raw_key]):
      mismatched.append(
          f"{ema_key} {np.shape(state_dict[ema_key])} vs {raw_key} {np.shape(state_dict[raw_key])}"
      )
    else:
      result[raw_key] = state_dict[ema_key]
  if missing:
    shown = ", ".join(sorted(missing)[:4]) + (
        f", ... ({len(missing) - 4} more)" if len(missing) > 4 else ""
    )
    raise CheckpointError(
        f"{source}: {len(missing)} of {len(names)} '{model_prefix}*' weights have no "
        f"'{ema_prefix}*' shadow (checkpoint trained without EMA?): {shown}"
    )
  if mismatched:
    raise CheckpointError(
        f"{source}: EMA shadow shapes differ from the raw weights: {'; '.join(mismatched[:4])}"
    )
  return result
