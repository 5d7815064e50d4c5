"""CelebA-HQ edge-to-face (label_nc 15) with LDM's CelebA-HQ VQ-f4 model.

Variants: ``configs/celebahq.py`` (official sizes) and ``configs/celebahq.py:tiny`` (the reduced
widths of the official parity fixtures, 32x32 images; for tests).
"""

from configs import base


def get_config(variant: str = ""):
  label_nc = 15
  if variant == "":
    models = dict(unet=base.ldm_vq_f4_unet(), first_stage=base.vq_f4(), corr=base.correspondence(label_nc))
    data = base.data("celebahq", label_nc, load_size=286)
  elif variant == "tiny":
    models = base.tiny_vq_models(label_nc)
    data = base.data("celebahq", label_nc, load_size=36, crop_size=32)
  else:
    raise ValueError(f"configs/celebahq.py: unknown variant {variant!r} (known: '', 'tiny')")
  return base.assemble(data_cfg=data, **models)
