"""DeepFashion pose-to-person (label_nc 20: pose RGB + 17 limb distance maps) with a VQ-f4 LDM.

The official code ships no DeepFashion LDM config; its released weights use the CelebA-HQ VQ-f4
architecture at 256x256 (64x64x3 latents), which is the default here. Variants: ``''`` (official
sizes), ``paper`` (the paper's learning rates, 3e-6 / 1.5e-7), ``tiny`` (fixture-sized widths, 32x32
images; for tests).
"""

from configs import base


def get_config(variant: str = ""):
  label_nc = 20
  if variant in ("", "paper"):
    models = dict(
        unet=base.ldm_vq_f4_unet(), first_stage=base.vq_f4(), corr=base.correspondence(label_nc)
    )
    data = base.data("deepfashion", label_nc, load_size=256)
  elif variant == "tiny":
    models = base.tiny_vq_models(label_nc)
    data = base.data("deepfashion", label_nc, load_size=32, crop_size=32)
  else:
    raise ValueError(
        f"configs/deepfashion.py: unknown variant {variant!r} (known: '', 'paper', 'tiny')"
    )
  config = base.assemble(data_cfg=data, **models)
  if variant == "paper":
    config.train.update(base.PAPER_LEARNING_RATES)
  if variant == "tiny":
    config.loss.vgg_widths = base.tiny_vgg_widths()
  return config
