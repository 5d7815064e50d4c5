"""The embedded synthetic data set with a tiny model that runs anywhere (CPU included), no downloads.

Same architecture family as CelebA-HQ (VQ-f4 first stage, unconditional LDM U-Net), fixture-sized
widths, 32x32 images and a 3-channel condition map.
"""

from configs import base


def get_config(variant: str = ""):
  if variant not in ("",):
    raise ValueError(f"configs/synthetic.py: unknown variant {variant!r} (known: '')")
  label_nc = 3
  config = base.assemble(data_cfg=base.data("synthetic", label_nc, load_size=32, crop_size=32),
                         **base.tiny_vq_models(label_nc))
  config.train.batch_size = 2
  config.train.warmup_iter = 10
  return config
