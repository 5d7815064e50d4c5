"""The embedded synthetic data set with a tiny model that runs anywhere (CPU included), no downloads.

Same architecture family as CelebA-HQ (VQ-f4 first stage, unconditional LDM U-Net) at fixture-sized
widths, 32x32 images. The condition has ``midms_jax.data.synthetic.LABEL_CHANNELS`` = 7 channels:
soft one-hot background + 5 shape classes, and a boundary channel (see that module).
"""

from configs import base
from midms_jax.data import synthetic


def get_config(variant: str = ""):
  if variant not in ("",):
    raise ValueError(f"configs/synthetic.py: unknown variant {variant!r} (known: '')")
  label_nc = synthetic.LABEL_CHANNELS
  data = base.data("synthetic", label_nc, load_size=32, crop_size=32)
  # Flipping only the ground truth would mirror textures the exemplar cannot reveal; one exemplar per sample.
  data.update(dict(flip=False, hard_reference_probability=0.0, image_size=32, min_objects=2, max_objects=4,
                   seed=0, train_size=100_000, validation_size=1_000))
  config = base.assemble(data_cfg=data, **base.tiny_vq_models(label_nc))
  config.loss.vgg_widths = base.tiny_vgg_widths()
  # No pretrained VGG installs offline for now: the VGG-based terms are off until the synthetic stage
  # gets its own loss network.
  config.loss.vgg = "none"
  config.train.update(dict(batch_size=2, warmup_iter=20, num_steps=60, log_every=10, image_every=20,
                           checkpoint_every=20, lr=1e-4, lr_diff_backbone=1e-5))
  return config
